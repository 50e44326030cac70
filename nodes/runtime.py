"""Conversions between ComfyUI values and the core's, and the progress callback of a node."""

from __future__ import annotations

import logging
from typing import Any, Optional, Sequence

from PIL import Image

from . import comfy_bridge

logger = logging.getLogger(__name__)


class NodeProgress:
    """Progress callback for the core: moves ComfyUI's progress bar and honours cancel.

    The core calls it after every model call. When the user pressed cancel, ComfyUI's
    InterruptProcessingException is raised from here, and the core lets it through unchanged,
    so a run stops within one model call. ``total`` is an estimate of the number of calls; the
    bar's total grows when a run makes more calls than estimated.
    """

    def __init__(self, total: int) -> None:
        self.total = max(1, int(total))
        self.calls = 0
        self.bar = comfy_bridge.new_progress_bar(self.total)

    def __call__(self, label: str) -> None:
        self.calls += 1
        if self.calls >= self.total:
            self.total = self.calls + 1
        if self.bar is not None:
            self.bar.update_absolute(self.calls, self.total)
        logger.debug("Model call %d of about %d done (%s).", self.calls, self.total, label)
        comfy_bridge.check_interrupted()

    def finish(self) -> None:
        if self.bar is not None:
            self.bar.update_absolute(self.total, self.total)


def first(value: Any) -> Any:
    """Return the single value of a widget input that arrives as a list (INPUT_IS_LIST nodes)."""
    if isinstance(value, list):
        return value[0] if value else None
    return value


def images_to_pil(images: Any) -> list[Image.Image]:
    """Turn IMAGE inputs into one PIL RGB image per picture.

    ``images`` is an IMAGE tensor ``[B, H, W, C]`` or a list of them (a list input, where the
    tensors may differ in size). Each batch entry becomes one image.
    """
    from patch_matters_core.images import load_image

    tensors = images if isinstance(images, list) else [images]
    pictures: list[Image.Image] = []
    for tensor in tensors:
        if tensor is None:
            continue
        if tensor.dim() == 3:
            tensor = tensor.unsqueeze(0)
        if tensor.dim() != 4:
            raise ValueError(
                f"IMAGE input has shape {tuple(tensor.shape)}; expected [batch, height, width, channels]."
            )
        for index in range(tensor.shape[0]):
            pictures.append(load_image(tensor[index]))
    if not pictures:
        raise ValueError("No image arrived at the image input; connect an IMAGE output such as Load Image.")
    return pictures


def pil_to_image(picture: Image.Image) -> Any:
    """Turn a PIL image into an IMAGE tensor ``[1, H, W, 3]``, float32 in 0..1."""
    import numpy as np
    import torch

    array = np.asarray(picture.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).unsqueeze(0)


def flatten(values: Optional[Sequence[Any]]) -> list[Any]:
    """Flatten a list input whose items may themselves be lists (one per upstream run)."""
    flat: list[Any] = []
    for value in values or []:
        if isinstance(value, list):
            flat.extend(value)
        else:
            flat.append(value)
    return flat


def pair_up(images: list[Image.Image], items: list[Any], item_name: str) -> list[tuple[Image.Image, Any]]:
    """Pair each image with the item made from it; raise when the counts differ."""
    if len(images) != len(items):
        raise ValueError(
            f"{len(images)} image(s) arrived but {len(items)} {item_name}; connect the same images "
            f"that the {item_name} were made from."
        )
    return list(zip(images, items))
