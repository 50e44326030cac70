"""Loading of user images into RGB, and crops sized for a vision model.

``load_image`` accepts a file path, a PIL image, a numpy array or a torch tensor (ComfyUI's
IMAGE is a float tensor of shape batch x height x width x channels in 0..1) and returns a fully
loaded RGB image. It converts the way a user expects: EXIF orientation is applied,
transparency is flattened onto mid-grey ``BACKGROUND_RGB``, 16-bit and float images are scaled
to 8 bits (float pixels in 0..1 or 0..255), and animations give their first frame. Anything that cannot become an image raises
``ImageLoadError`` with the file name, the reason and what to do.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from pathlib import Path
from typing import Any, Optional

from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageLoadError
from .types import Box

logger = logging.getLogger(__name__)

# Extensions that a folder scan picks up; compare with ``path.suffix.lower()``.
SUPPORTED_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
)

# Colour that transparent pixels are flattened onto: neutral mid-grey, so that neither a black
# nor a white object disappears into the background.
BACKGROUND_RGB: tuple[int, int, int] = (128, 128, 128)

# Largest image, in pixels, that load_image decodes by default: 2 x Pillow's default
# Image.MAX_IMAGE_PIXELS (89,478,485 in Pillow 13), where Pillow itself raises
# DecompressionBombError. A 48-megapixel photograph loads; a 200-megapixel file is rejected
# before decoding. The decoded RGB copy needs 3 bytes per pixel, about 540 MB at this limit.
# Pillow still emits its DecompressionBombWarning for images above Image.MAX_IMAGE_PIXELS.
DEFAULT_MAX_IMAGE_PIXELS = 178_956_970

ARRAY_NAME = "array input"

# Largest maximum of a float image that is still read as 0..1. Values up to this limit are
# overshoot (from sharpening or unclamped arithmetic) and are clipped to 1. A float image with
# a larger maximum is read as 0..255, because a 0..255 image whose brightest pixel is at most 2
# is almost black and rare, while overshoot of 0..1 images is common.
FLOAT_UNIT_RANGE_LIMIT = 2.0


def is_supported_file(path: str | Path) -> bool:
    """Return whether a file name has one of ``SUPPORTED_EXTENSIONS``, in any letter case."""
    return Path(path).suffix.lower() in SUPPORTED_EXTENSIONS


def load_image(
    source: Any,
    name: Optional[str] = None,
    max_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS,
) -> Image.Image:
    """Load ``source`` as a fully decoded RGB image.

    ``source`` is a path (``str`` or ``Path``), a PIL image, a numpy array or a torch tensor.
    Arrays are height x width, or height x width x 1, 3 or 4 channels, of dtype uint8, uint16,
    bool or float; a leading batch dimension of size 1 is dropped. ``name`` replaces the file
    name or "array input" in error messages.

    ``max_pixels`` caps width x height for files and is checked before decoding; ``None``
    leaves only Pillow's own limit (``PIL.Image.MAX_IMAGE_PIXELS`` x 2). Arrays and PIL
    images are already in memory and are not capped.

    Conversion steps:

    - EXIF orientation is applied to files and PIL images.
    - RGBA, LA, PA and images with a transparency key are composited onto
      ``BACKGROUND_RGB`` (128, 128, 128).
    - 16-bit and 32-bit integer pixels are scaled to 0..255. Float pixels (arrays, tensors
      and PIL mode "F") whose maximum is at most ``FLOAT_UNIT_RANGE_LIMIT`` (2.0) are read as
      0..1 and multiplied by 255. A larger maximum up to 255 means 0..255: the values are
      used as they are, with a WARNING. A maximum above 255 raises ImageLoadError. Values
      outside the range are clipped, with a WARNING.
    - CMYK, palette, 1-bit and grayscale images become RGB. Pillow's JPEG decoder reads CMYK
      JPEGs with Adobe's inverted convention (raw mode "CMYK;I"), so they are not inverted.
    - A file with several frames gives its first frame.

    Raises ImageLoadError naming the input, the reason and a fix.
    """
    if isinstance(source, (str, os.PathLike)):
        return _load_path(Path(source), name, max_pixels)
    if isinstance(source, Image.Image):
        label = name or _pil_label(source)
        return _convert_pil(source, label)
    if _is_torch_tensor(source):
        return _load_array(_tensor_to_numpy(source, name or ARRAY_NAME), name or ARRAY_NAME)
    if type(source).__module__ == "numpy" or hasattr(source, "__array_interface__"):
        import numpy as np

        return _load_array(np.asarray(source), name or ARRAY_NAME)
    raise ImageLoadError(
        f"{name or 'image input'}: unsupported input type {type(source).__name__}; pass a file "
        "path, a PIL image, a numpy array or a torch tensor."
    )


def image_sha256(image: Image.Image) -> str:
    """Return the SHA-256 hex digest of an image's size and RGB pixels.

    Two images with the same pixels have the same hash, whatever file they came from. The
    size is hashed too, so a 2x3 and a 3x2 image with the same bytes differ.
    """
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    digest = hashlib.sha256()
    digest.update(f"{rgb.width}x{rgb.height}:".encode("ascii"))
    digest.update(rgb.tobytes())
    return digest.hexdigest()


def crop_for_model(image: Image.Image, box: Box, max_pixels: int, min_side: int) -> Image.Image:
    """Crop ``box`` from the full-resolution image and size the crop for a vision model.

    The box is rounded outward to whole pixels and clipped to the image; a box that ends up
    empty becomes the nearest 1x1 pixel. The crop is then resized by one factor that keeps
    its aspect ratio: down until width x height <= ``max_pixels``, or up until the shorter
    side is ``min_side``. When both rules cannot hold at once (a 2000x3 strip with a small
    ``max_pixels``), the shorter side stays at ``min_side`` and the longer side is cut to
    ``max_pixels // min_side``, which changes the aspect ratio. The result always has both
    sides >= ``min_side`` and width x height <= ``max_pixels``.

    Raises ValueError when ``min_side`` < 1 or ``max_pixels`` < ``min_side`` squared.
    """
    if min_side < 1:
        raise ValueError(f"min_side must be at least 1, got {min_side}.")
    if max_pixels < min_side * min_side:
        raise ValueError(
            f"max_pixels ({max_pixels}) must be at least min_side squared ({min_side * min_side})."
        )

    left, top, right, bottom = _pixel_box(box, image.width, image.height)
    crop = image.crop((left, top, right, bottom))
    target = _target_size(crop.width, crop.height, max_pixels, min_side)
    if target == crop.size:
        return crop

    shrinking = target[0] * target[1] < crop.width * crop.height
    resample = Image.Resampling.LANCZOS if shrinking else Image.Resampling.BICUBIC
    # reducing_gap lets Pillow shrink by whole factors first, which keeps a 48-megapixel crop fast.
    return crop.resize(target, resample=resample, reducing_gap=3.0 if shrinking else None)


def _pixel_box(box: Box, width: int, height: int) -> tuple[int, int, int, int]:
    """Round a box outward to integers, clip it to the image and keep it at least 1x1."""
    left = min(max(math.floor(box.x0), 0), width - 1)
    top = min(max(math.floor(box.y0), 0), height - 1)
    right = min(max(math.ceil(box.x1), left + 1), width)
    bottom = min(max(math.ceil(box.y1), top + 1), height)
    return left, top, right, bottom


def _target_size(width: int, height: int, max_pixels: int, min_side: int) -> tuple[int, int]:
    scale = 1.0
    if width * height > max_pixels:
        scale = math.sqrt(max_pixels / (width * height))
    if min(width, height) * scale < min_side:
        scale = min_side / min(width, height)

    new_width = max(min_side, math.floor(width * scale + 1e-6))
    new_height = max(min_side, math.floor(height * scale + 1e-6))
    if new_width * new_height > max_pixels:
        if new_width >= new_height:
            new_width = max(min_side, max_pixels // new_height)
        else:
            new_height = max(min_side, max_pixels // new_width)
    return new_width, new_height


def _pil_label(image: Image.Image) -> str:
    filename = getattr(image, "filename", "")
    return Path(filename).name if filename else "PIL image input"


def _load_path(path: Path, name: Optional[str], max_pixels: Optional[int]) -> Image.Image:
    label = name or path.name or str(path)
    if not path.exists():
        raise ImageLoadError(f"{label}: file not found at {path}; check the path.")
    if path.is_dir():
        raise ImageLoadError(f"{label}: {path} is a directory, not an image file; pass a file inside it.")
    try:
        size = path.stat().st_size
    except OSError as error:
        raise ImageLoadError(f"{label}: cannot read the file ({error}); check its permissions.") from error
    if size == 0:
        raise ImageLoadError(f"{label}: the file is empty (0 bytes); replace it with a valid image.")

    try:
        with Image.open(path) as opened:
            _check_pixel_limit(opened, label, max_pixels)
            opened.load()
            return _convert_pil(opened, label)
    except ImageLoadError:
        raise
    except PermissionError as error:
        raise ImageLoadError(f"{label}: cannot read the file ({error}); check its permissions.") from error
    except UnidentifiedImageError as error:
        raise ImageLoadError(
            f"{label}: not an image file, or a format Pillow cannot read; convert it to one of "
            f"{', '.join(sorted(SUPPORTED_EXTENSIONS))}."
        ) from error
    except Image.DecompressionBombError as error:
        raise ImageLoadError(
            f"{label}: image too large for Pillow's decompression-bomb limit ({error}); raise "
            "PIL.Image.MAX_IMAGE_PIXELS if the file is trusted, or downscale it."
        ) from error
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        reason = "truncated or corrupt image data" if "truncated" in str(error).lower() else "cannot be decoded"
        raise ImageLoadError(
            f"{label}: {reason} ({error}); re-export or re-download the file."
        ) from error


def _check_pixel_limit(image: Image.Image, label: str, max_pixels: Optional[int]) -> None:
    width, height = image.size
    if width < 1 or height < 1:
        raise ImageLoadError(f"{label}: zero-size image ({width}x{height}); replace it with a valid image.")
    if max_pixels is not None and width * height > max_pixels:
        raise ImageLoadError(
            f"{label}: {width}x{height} is {width * height:,} pixels, above the limit of "
            f"{max_pixels:,} pixels; downscale the image or pass a larger max_pixels to load_image."
        )


def _convert_pil(image: Image.Image, label: str) -> Image.Image:
    """Return a new RGB image, detached from any file, from the current frame of ``image``."""
    if image.width < 1 or image.height < 1:
        raise ImageLoadError(f"{label}: zero-size image ({image.width}x{image.height}); replace it with a valid image.")

    try:
        image.load()
        # exif_transpose returns a new image (a copy when no rotation is needed).
        upright = ImageOps.exif_transpose(image)
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise ImageLoadError(f"{label}: cannot be decoded ({error}); re-export the image.") from error

    mode = upright.mode
    if mode == "RGB" and "transparency" not in upright.info:
        return upright
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        return _high_depth_to_rgb(upright, label)
    has_alpha_palette = mode == "P" and upright.palette is not None and upright.palette.mode == "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in upright.info or has_alpha_palette:
        return _flatten(upright.convert("RGBA"))
    try:
        return upright.convert("RGB")
    except ValueError as error:
        raise ImageLoadError(
            f"{label}: pixel mode {mode} cannot be converted to RGB ({error}); save the image as RGB."
        ) from error


def _flatten(rgba: Image.Image) -> Image.Image:
    background = Image.new("RGBA", rgba.size, BACKGROUND_RGB + (255,))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _high_depth_to_rgb(image: Image.Image, label: str) -> Image.Image:
    """Scale 16-bit, 32-bit integer or float pixels to 8 bits and return an RGB image."""
    import numpy as np

    values = np.asarray(image).astype(np.float64)
    if image.mode == "F":
        return _gray_to_rgb(_float_to_uint8(values, label))
    return _gray_to_rgb(_integer_to_uint8(values))


def _integer_to_uint8(values: Any) -> Any:
    """Map integer pixels to 0..255: 8-bit values stay, 16-bit values are divided by 257.

    Values above 65535 (32-bit images) are stretched from their own minimum to maximum.
    """
    import numpy as np

    if values.size == 0:
        return values.astype(np.uint8)
    low, high = float(values.min()), float(values.max())
    if low >= 0 and high <= 255:
        return values.astype(np.uint8)
    if low >= 0 and high <= 65535:
        return np.round(values / 257.0).astype(np.uint8)
    span = high - low if high > low else 1.0
    return np.round((values - low) / span * 255.0).astype(np.uint8)


def _float_to_uint8(values: Any, label: str) -> Any:
    """Map float pixels in 0..1 or 0..255 to 0..255, picking the range from the maximum value.

    Values outside the chosen range are clipped, with a WARNING.
    """
    import numpy as np

    if not np.all(np.isfinite(values)):
        raise ImageLoadError(
            f"{label}: float pixels contain NaN or infinite values; replace them before loading."
        )
    if values.size == 0:
        return values.astype(np.uint8)

    low, high = float(values.min()), float(values.max())
    if high > 255.0:
        raise ImageLoadError(
            f"{label}: float pixels range from {low:g} to {high:g}, outside both 0..1 and 0..255; "
            "scale them to 0..1 (for example values / values.max()) or convert them to uint8."
        )

    if high > FLOAT_UNIT_RANGE_LIMIT:
        logger.warning(
            "%s: float pixels range from %g to %g, above 0..1, so they are read as 0..255. "
            "Pass floats in 0..1 or uint8 pixels to avoid this guess.",
            label,
            low,
            high,
        )
        scale, top = 1.0, 255.0
    else:
        scale, top = 255.0, 1.0

    outside = int(np.count_nonzero((values < 0.0) | (values > top)))
    if outside:
        logger.warning(
            "%s: %d float pixel values lie outside 0..%g (from %g to %g) and were clipped.",
            label,
            outside,
            top,
            low,
            high,
        )
    return np.round(np.clip(values, 0.0, top) * scale).astype(np.uint8)


def _gray_to_rgb(gray: Any) -> Image.Image:
    return Image.fromarray(gray).convert("RGB")


def _is_torch_tensor(source: Any) -> bool:
    return type(source).__module__.startswith("torch") and hasattr(source, "detach")


def _tensor_to_numpy(tensor: Any, label: str) -> Any:
    """Copy a torch tensor to a CPU numpy array; bfloat16 and float16 become float32."""
    import torch

    data = tensor.detach().cpu()
    if data.dtype in (torch.bfloat16, torch.float16):
        data = data.float()
    try:
        return data.numpy()
    except TypeError as error:
        raise ImageLoadError(
            f"{label}: tensor dtype {tensor.dtype} has no numpy equivalent ({error}); pass a "
            "float32 tensor in 0..1 or a uint8 tensor."
        ) from error


def _load_array(array: Any, label: str) -> Image.Image:
    """Convert a height x width (x channels) array of a supported dtype to an RGB image."""
    import numpy as np

    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]

    shape_ok = array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))
    if not shape_ok:
        hint = " (a batch: pass one image, e.g. images[0])" if array.ndim == 4 else ""
        raise ImageLoadError(
            f"{label}: shape {tuple(array.shape)} is not an image{hint}; expected height x width "
            "or height x width x channels with 1, 3 or 4 channels, channels last."
        )
    if array.shape[0] < 1 or array.shape[1] < 1:
        raise ImageLoadError(f"{label}: zero-size image of shape {tuple(array.shape)}; pass a non-empty array.")

    pixels = _array_to_uint8(array, label)
    pixels = np.ascontiguousarray(pixels)
    if pixels.ndim == 2:
        return _gray_to_rgb(pixels)
    if pixels.shape[2] == 4:
        return _flatten(Image.fromarray(pixels))
    return Image.fromarray(pixels)


def _array_to_uint8(array: Any, label: str) -> Any:
    import numpy as np

    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if array.dtype == np.uint16:
        return np.round(array.astype(np.float64) / 257.0).astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating):
        return _float_to_uint8(array.astype(np.float64), label)
    raise ImageLoadError(
        f"{label}: unsupported dtype {array.dtype}; use uint8 (0..255), uint16 (0..65535), bool, "
        "or float in 0..1 or 0..255, for example array.astype(numpy.uint8)."
    )
