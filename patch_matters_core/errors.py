"""Exceptions that carry a message a user can act on."""


class PatchMattersError(Exception):
    """Base class of every error this package raises on purpose."""


class ImageLoadError(PatchMattersError):
    """An image file or array cannot be read or converted to RGB; the message names it."""


class ModelLoadError(PatchMattersError):
    """A model cannot be found or loaded; the message names the model and how to put it in place."""


class MissingDependencyError(PatchMattersError):
    """An optional package is needed for the requested model; the message names the package."""


class ConfigError(PatchMattersError):
    """A setting has an invalid value; the message names the setting and the valid range."""
