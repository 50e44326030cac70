"""Prompt templates of the text steps, stored as ``prompts/*.txt`` package data.

A template marks each value to fill in as ``$name`` (``string.Template`` syntax), so the
braces of the JSON examples inside the sorting prompt need no escaping.
"""

from __future__ import annotations

import functools
import string
from importlib import resources

from ..errors import PatchMattersError


@functools.lru_cache(maxsize=None)
def load(name: str) -> string.Template:
    """Read the template ``<name>.txt`` shipped with the package."""
    path = resources.files(__name__).joinpath(f"{name}.txt")
    if not path.is_file():
        raise PatchMattersError(
            f"Prompt template {name!r} not found at {path}; reinstall patch-matters so that "
            "its prompts/*.txt files are present."
        )
    return string.Template(path.read_text(encoding="utf-8").rstrip("\n"))


def render(name: str, **values: object) -> str:
    """Fill in template ``name`` with ``values``; raise PatchMattersError naming any missing value."""
    template = load(name)
    try:
        return template.substitute({key: str(value) for key, value in values.items()})
    except KeyError as error:
        raise PatchMattersError(
            f"Prompt template {name!r} needs the value {error.args[0]!r}, which was not given."
        ) from error
