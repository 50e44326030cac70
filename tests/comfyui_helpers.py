"""Helpers for the node tests: importing the pack the way ComfyUI does, and images as IMAGE tensors."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent
PACK_MODULE_NAME = "patch_matters_pack"


def import_pack() -> ModuleType:
    """Import the pack's ``__init__.py`` as a package, as ComfyUI's custom node loader does."""
    if PACK_MODULE_NAME in sys.modules:
        return sys.modules[PACK_MODULE_NAME]
    spec = importlib.util.spec_from_file_location(
        PACK_MODULE_NAME, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK_MODULE_NAME] = module
    spec.loader.exec_module(module)
    return module


def pack_module(name: str) -> ModuleType:
    """Return a submodule of the imported pack, for example ``nodes.comfy_bridge``."""
    import_pack()
    return sys.modules[f"{PACK_MODULE_NAME}.{name}"]


def image_tensor(path: Path, width: int, height: int):
    """Load a photograph as an IMAGE tensor ``[1, height, width, 3]`` in 0..1."""
    import numpy as np
    import torch
    from PIL import Image

    with Image.open(path) as picture:
        resized = picture.convert("RGB").resize((width, height))
    return torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0).unsqueeze(0)
