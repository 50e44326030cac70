"""Describe stage: one global description, and N sampled descriptions of every described patch."""

from __future__ import annotations

import logging
import math
import re
import time
from typing import Optional, Sequence

from PIL import Image

from ..config import DescribeConfig, GenerationSettings
from ..images import crop_for_model
from ..models.base import Generation, ProgressCallback, VisionLanguageModel, VisionRequest
from ..types import GLOBAL, Box, Descriptions, Fallback, PatchSet

logger = logging.getLogger(__name__)

# Outputs that describe nothing: a model declining, or requesting the image it was given.
_REFUSAL = re.compile(
    r"^(i'?m sorry|sorry,|i cannot|i can'?t|i am unable|as an ai|please (provide|upload))",
    re.IGNORECASE,
)


def describe_global(
    image: Image.Image,
    vlm: VisionLanguageModel,
    config: DescribeConfig,
    seed: Optional[int] = None,
    progress: Optional[ProgressCallback] = None,
) -> tuple[str, list[Fallback]]:
    """Describe the whole image once at low temperature; return the text and any fallbacks."""
    start = time.perf_counter()
    logger.info("Describing the whole image.")

    request = VisionRequest(image=_crop(image, _whole(image), config, vlm), prompt=config.global_prompt)
    [generation] = _generate(vlm, [request], config.global_generation, config.batch_size, seed, progress)
    fallbacks: list[Fallback] = []
    text = _usable_text(generation, GLOBAL, 0, config.global_generation, fallbacks)

    logger.info("Described the whole image: %d characters in %.1f s.", len(text), time.perf_counter() - start)
    return text, fallbacks


def describe(
    image: Image.Image,
    patches: PatchSet,
    vlm: VisionLanguageModel,
    config: DescribeConfig,
    seed: Optional[int] = None,
    progress: Optional[ProgressCallback] = None,
    global_description: Optional[str] = None,
) -> Descriptions:
    """Describe every described patch ``config.num_samples`` times with sampling.

    The global description is generated too unless ``global_description`` is given. All patch
    samples go to the VLM as one list of requests, which the backend batches. The outputs are
    stored by (patch name, sample index), so no patch can receive another patch's samples.
    """
    start = time.perf_counter()
    fallbacks: list[Fallback] = []

    if global_description is None:
        global_description, global_fallbacks = describe_global(image, vlm, config, seed, progress)
        fallbacks.extend(global_fallbacks)

    keys: list[tuple[str, int]] = []
    requests: list[VisionRequest] = []
    for patch in patches.patches:
        if patch.name == GLOBAL or not patch.described:
            continue
        crop = _crop(image, patch.box, config, vlm)
        for sample_index in range(config.num_samples):
            keys.append((patch.name, sample_index))
            requests.append(VisionRequest(image=crop, prompt=config.patch_prompt))

    logger.info(
        "Describing %d patches, %d samples each: %d requests.",
        len(requests) // max(1, config.num_samples),
        config.num_samples,
        len(requests),
    )
    generations = _generate(vlm, requests, config.sample_generation, config.batch_size, seed, progress)

    samples: dict[str, list[str]] = {GLOBAL: [global_description]}
    for (patch_name, sample_index), generation in zip(keys, generations, strict=True):
        text = _usable_text(generation, patch_name, sample_index, config.sample_generation, fallbacks)
        samples.setdefault(patch_name, [""] * config.num_samples)[sample_index] = text

    usable = sum(1 for name, texts in samples.items() if name != GLOBAL for text in texts if text)
    logger.info(
        "Described %d patches: %d of %d samples usable, in %.1f s.",
        len(samples) - 1,
        usable,
        len(requests),
        time.perf_counter() - start,
    )
    return Descriptions(patches=patches, samples=samples, fallbacks=fallbacks)


def _whole(image: Image.Image) -> Box:
    return Box(0, 0, image.width, image.height)


def _crop(image: Image.Image, box: Box, config: DescribeConfig, vlm: VisionLanguageModel) -> Image.Image:
    min_side = max(config.min_side, getattr(vlm, "min_side", 1))
    crop = crop_for_model(image, box, max_pixels=config.max_pixels, min_side=min_side)
    return pad_to_aspect_ratio(crop, MAX_ASPECT_RATIO)


# Qwen2-VL and Qwen2.5-VL processors reject images whose long side is 200 or more times the
# short side, so a thin strip is padded to this ratio instead.
MAX_ASPECT_RATIO = 50.0
# Mid grey, the background load_image flattens transparency onto.
PAD_COLOR = (128, 128, 128)


def pad_to_aspect_ratio(image: Image.Image, max_ratio: float) -> Image.Image:
    """Pad the short side with grey, centred, so that long side / short side <= ``max_ratio``."""
    width, height = image.size
    if max(width, height) <= max_ratio * min(width, height):
        return image
    if width > height:
        size = (width, math.ceil(width / max_ratio))
    else:
        size = (math.ceil(height / max_ratio), height)
    padded = Image.new("RGB", size, PAD_COLOR)
    padded.paste(image, ((size[0] - width) // 2, (size[1] - height) // 2))
    return padded


def _generate(
    vlm: VisionLanguageModel,
    requests: Sequence[VisionRequest],
    settings: GenerationSettings,
    batch_size: int,
    seed: Optional[int],
    progress: Optional[ProgressCallback],
) -> list[Generation]:
    """Send the requests in chunks of ``batch_size`` (all at once when it is 0)."""
    if not requests:
        return []
    size = batch_size or len(requests)
    generations: list[Generation] = []
    for offset in range(0, len(requests), size):
        chunk_seed = None if seed is None else seed + offset
        generations.extend(vlm.describe(requests[offset : offset + size], settings, seed=chunk_seed, progress=progress))
    if len(generations) != len(requests):
        raise RuntimeError(f"The VLM returned {len(generations)} outputs for {len(requests)} requests.")
    return generations


def _usable_text(
    generation: Generation,
    patch_name: str,
    sample_index: int,
    settings: GenerationSettings,
    fallbacks: list[Fallback],
) -> str:
    """Return the cleaned text, or "" with a recorded fallback when it describes nothing."""
    text = generation.text.strip()
    where = f"{patch_name} sample {sample_index}"

    if generation.hit_token_limit and text:
        reason = f"{where}: output cut at max_new_tokens={settings.max_new_tokens}; the cut text is used"
        logger.warning("Describe: %s.", reason)
        fallbacks.append(Fallback(stage="describe", patch=patch_name, reason=reason))
    if generation.repeated and text:
        reason = f"{where}: output kept repeating one passage; it was cut after the first copy and used"
        logger.warning("Describe: %s.", reason)
        fallbacks.append(Fallback(stage="describe", patch=patch_name, reason=reason))

    if not text:
        reason = f"{where}: the VLM returned no usable text; the sample is left out"
    elif _REFUSAL.match(text):
        reason = f"{where}: the VLM declined to describe the image ({text[:60]!r}); the sample is left out"
    else:
        return text

    logger.warning("Describe: %s.", reason)
    fallbacks.append(Fallback(stage="describe", patch=patch_name, reason=reason))
    return ""
