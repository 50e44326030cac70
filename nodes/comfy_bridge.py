"""Access to ComfyUI's modules, for a pack that must also import where ComfyUI is absent.

The node pack runs inside ComfyUI, but its unit tests import it without ComfyUI. Every use of
``comfy.*`` and ``folder_paths`` goes through this module, which imports them once and offers
plain fallbacks when they are missing: no memory manager, no progress bar, no interrupt.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Optional

logger = logging.getLogger(__name__)

try:  # ComfyUI's modules exist only inside a running ComfyUI.
    import comfy.model_management as model_management
    import comfy.model_patcher as model_patcher
    import comfy.utils as comfy_utils
    import folder_paths
except ImportError:
    model_management = None
    model_patcher = None
    comfy_utils = None
    folder_paths = None

IN_COMFYUI = model_management is not None and folder_paths is not None

# Model folder kinds that this pack scans. "LLM" and "VLM" are the folders other caption and
# VLM packs use; "detection" and "itm" hold the detector and image-text matching models.
MODEL_FOLDER_KINDS = ("LLM", "VLM", "detection", "itm")


def register_model_folders() -> None:
    """Add ``models/<kind>`` for each kind in ``MODEL_FOLDER_KINDS`` to ComfyUI's folder list.

    Folders that a user names in ``extra_model_paths.yaml`` stay registered; this only adds the
    default location beside them.
    """
    if folder_paths is None:
        return
    for kind in MODEL_FOLDER_KINDS:
        folder_paths.add_model_folder_path(kind, os.path.join(folder_paths.models_dir, kind))


def model_folders(kinds: tuple[str, ...] = MODEL_FOLDER_KINDS) -> list[str]:
    """List every configured folder of the given kinds, in ComfyUI's order, without duplicates.

    Outside ComfyUI, the environment variable PATCH_MATTERS_MODEL_DIRS (paths separated by
    ``os.pathsep``) names the folders instead.
    """
    folders: list[str] = []
    if folder_paths is not None:
        for kind in kinds:
            try:
                folders.extend(folder_paths.get_folder_paths(kind))
            except KeyError:
                continue
    else:
        folders.extend(p for p in os.environ.get("PATCH_MATTERS_MODEL_DIRS", "").split(os.pathsep) if p)

    unique: list[str] = []
    for folder in folders:
        if folder not in unique:
            unique.append(folder)
    return unique


def check_interrupted() -> None:
    """Raise ComfyUI's InterruptProcessingException when the user pressed cancel."""
    if model_management is not None:
        model_management.throw_exception_if_processing_interrupted()


def new_progress_bar(total: int) -> Optional[Any]:
    """Return a ComfyUI progress bar, or None outside ComfyUI."""
    if comfy_utils is None:
        return None
    return comfy_utils.ProgressBar(total)


def comfy_devices(requested: str) -> tuple[Any, Any]:
    """Return ComfyUI's (load device, offload device) for a device choice of a loader node."""
    import torch

    if requested == "auto":
        return model_management.get_torch_device(), model_management.unet_offload_device()
    device = torch.device(requested)
    return device, torch.device("cpu")


def comfy_dtype(load_device: Any) -> str:
    """Return the dtype that ComfyUI would use for a model on ``load_device``."""
    if model_management.should_use_bf16(load_device):
        return "bfloat16"
    if model_management.should_use_fp16(load_device):
        return "float16"
    return "float32"
