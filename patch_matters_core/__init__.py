"""Patch Matters: training-free fine-grained caption enhancement through local perception.

Importing this package loads neither torch nor transformers; models load when a pipeline is
built from sources or a loader is called.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

from .config import PipelineConfig
from .errors import ConfigError, ImageLoadError, MissingDependencyError, ModelLoadError, PatchMattersError
from .types import Trace

if TYPE_CHECKING:
    from .images import load_image
    from .pipeline import PatchMatters

__all__ = [
    "ConfigError",
    "ImageLoadError",
    "MissingDependencyError",
    "ModelLoadError",
    "PatchMatters",
    "PatchMattersError",
    "PipelineConfig",
    "Trace",
    "load_image",
]


def __getattr__(name: str) -> Any:
    if name == "PatchMatters":
        from .pipeline import PatchMatters

        return PatchMatters
    if name == "load_image":
        from .images import load_image

        return load_image
    raise AttributeError(f"module 'patch_matters_core' has no attribute {name!r}")
