"""Divide stage: cut an image into the global, semantic and four spatial patches.

1. The detector is queried with the object nouns of the global caption. Detections scoring
   above ``detection_threshold`` are kept. When none does, the best ``fallback_detections``
   are kept if there are that many. Otherwise the whole image is the only object.
2. Overlapping object boxes (IoU above ``merge_iou``) are merged into their union until no
   such pair is left.
3. The four quadrants grow around every merged object that lies inside them by more than
   ``quadrant_overlap`` of its own area.
4. The semantic patch is the union of the kept detections whose label the caption names,
   or the whole image when none does.
5. The semantic patch is described only when its IoU with the whole image is below
   ``semantic_max_iou``, because otherwise the global description already covers it.
"""

from __future__ import annotations

import logging
import time
from typing import Optional, Sequence

from PIL import Image

from ..config import DivideConfig
from ..geometry import clip_box, iou, merge_overlapping, spatial_patches, union_all, whole_image
from ..models.base import Detector, ProgressCallback
from ..types import GLOBAL, SEMANTIC, SPATIAL_PATCH_NAMES, Box, Detection, Fallback, Patch, PatchSet
from ..vocabulary import COCO_CLASSES, extract_object_nouns, nouns_match

logger = logging.getLogger(__name__)

STAGE = "divide"


def divide(
    image: Image.Image,
    global_caption: str,
    detector: Optional[Detector],
    config: DivideConfig,
    progress: Optional[ProgressCallback] = None,
) -> PatchSet:
    """Return the patches of ``image``: global, semantic, and the four spatial patches in order.

    Without a detector the spatial patches are the plain quadrants and the semantic patch is
    the whole image (not described), recorded as a fallback. An exception from the detector
    propagates unchanged. Detector boxes are clipped to the image, and boxes left with zero
    area are dropped with a warning.
    """
    started = time.perf_counter()
    if detector is None:
        return _divide_without_detector(image, global_caption, started)

    width, height = image.size
    whole = whole_image(width, height)
    nouns, raw_detections, fallbacks = _query_detector(image, global_caption, detector)
    if progress is not None:
        progress(STAGE)

    usable = _clip_detections(raw_detections, width, height)
    kept_detections, fallback = _select_detections(usable, config)
    if fallback is not None:
        logger.warning("divide: %s.", fallback.reason)
        fallbacks.append(fallback)

    object_boxes = [detection.box for detection in kept_detections] or [whole]
    merged = merge_overlapping(object_boxes, config.merge_iou)
    spatial = spatial_patches(width, height, merged, config.quadrant_overlap)

    semantic_box, matched_labels, fallback = _semantic_patch(kept_detections, nouns, whole)
    if fallback is not None:
        logger.warning("divide: %s.", fallback.reason)
        fallbacks.append(fallback)
    semantic_iou = iou(semantic_box, whole)
    semantic_described = semantic_iou < config.semantic_max_iou

    patches = [Patch(GLOBAL, whole, described=True), Patch(SEMANTIC, semantic_box, described=semantic_described)]
    patches.extend(Patch(name, spatial[name], described=True) for name in SPATIAL_PATCH_NAMES)
    logger.info(
        "divide: kept %d of %d detections, %d merged objects, %d matched labels, semantic patch "
        "IoU with the image %.2f (described: %s), %.2f s",
        len(kept_detections),
        len(raw_detections),
        len(merged),
        len(matched_labels),
        semantic_iou,
        semantic_described,
        time.perf_counter() - started,
    )
    return PatchSet(
        width=width,
        height=height,
        patches=patches,
        global_caption=global_caption,
        detections=kept_detections,
        merged_objects=merged,
        matched_labels=matched_labels,
        fallbacks=fallbacks,
    )


def _query_detector(
    image: Image.Image, global_caption: str, detector: Detector
) -> tuple[list[str], list[Detection], list[Fallback]]:
    """Query the detector with the caption's object nouns, or with the COCO classes when it names none."""
    fallbacks: list[Fallback] = []
    nouns = extract_object_nouns(global_caption)
    queries = list(nouns)
    if not queries:
        queries = list(COCO_CLASSES)
        reason = "the global caption names no known object; the detector was queried with the 80 COCO class names"
        logger.warning("divide: %s.", reason)
        fallbacks.append(Fallback(stage=STAGE, patch=None, reason=reason))

    detector_name = detector.info.source or detector.info.family or type(detector).__name__
    logger.info(
        "divide: querying detector %s with %d labels on a %dx%d image",
        detector_name,
        len(queries),
        image.width,
        image.height,
    )
    started = time.perf_counter()
    raw_detections = list(detector.detect(image, queries))
    logger.info(
        "divide: detector returned %d detections in %.2f s",
        len(raw_detections),
        time.perf_counter() - started,
    )
    return nouns, raw_detections, fallbacks


def _semantic_patch(
    detections: Sequence[Detection], nouns: Sequence[str], whole: Box
) -> tuple[Box, list[str], Optional[Fallback]]:
    """Return the union of the detections that the caption names, or the whole image with a fallback."""
    matched = [detection for detection in detections if nouns and nouns_match(detection.label, nouns)]
    if matched:
        return union_all(detection.box for detection in matched), _unique_labels(matched), None

    reason = f"{_no_match_reason(nouns, detections)}; the semantic patch is the whole image"
    return whole, [], Fallback(stage=STAGE, patch=SEMANTIC, reason=reason)


def _divide_without_detector(image: Image.Image, global_caption: str, started: float) -> PatchSet:
    width, height = image.size
    whole = whole_image(width, height)
    reason = "no detector: the spatial patches are the plain quadrants and the semantic patch is the whole image"
    logger.warning("divide: %s.", reason)

    spatial = spatial_patches(width, height, [], 0.0)
    patches = [Patch(GLOBAL, whole, described=True), Patch(SEMANTIC, whole, described=False)]
    patches.extend(Patch(name, spatial[name], described=True) for name in SPATIAL_PATCH_NAMES)
    logger.info("divide: %d patches without a detector, %.2f s", len(patches), time.perf_counter() - started)
    return PatchSet(
        width=width,
        height=height,
        patches=patches,
        global_caption=global_caption,
        fallbacks=[Fallback(stage=STAGE, patch=None, reason=reason)],
    )


def _clip_detections(detections: Sequence[Detection], width: int, height: int) -> list[Detection]:
    """Clip every box to the image and drop the boxes that have no area left."""
    usable: list[Detection] = []
    for detection in detections:
        clipped = clip_box(detection.box, width, height)
        if clipped.area <= 0:
            logger.warning(
                "divide: dropped detection %r (score %.3f) with box %s: zero area inside the %dx%d image",
                detection.label,
                detection.score,
                detection.box.to_list(),
                width,
                height,
            )
            continue
        usable.append(Detection(label=detection.label, score=float(detection.score), box=clipped))
    return usable


def _select_detections(
    detections: list[Detection], config: DivideConfig
) -> tuple[list[Detection], Optional[Fallback]]:
    """Apply the score threshold, with the best-few and whole-image fallbacks."""
    passing = [d for d in detections if d.score > config.detection_threshold]
    if passing:
        return passing, None

    threshold = config.detection_threshold
    if detections and config.fallback_detections > 0 and len(detections) >= config.fallback_detections:
        best = sorted(detections, key=lambda d: d.score, reverse=True)[: config.fallback_detections]
        scores = ", ".join(f"{d.label} {d.score:.3f}" for d in best)
        reason = f"no detection scored above {threshold}; kept the {len(best)} best ({scores})"
        return best, Fallback(stage=STAGE, patch=None, reason=reason)

    if not detections:
        reason = "the detector found no object; the whole image is the only object"
    elif config.fallback_detections > 0:
        reason = (
            f"no detection scored above {threshold}, and {len(detections)} detections are fewer than "
            f"the {config.fallback_detections} that the best-detections fallback needs; the whole "
            "image is the only object"
        )
    else:
        reason = f"no detection scored above {threshold}; the whole image is the only object"
    return [], Fallback(stage=STAGE, patch=None, reason=reason)


def _unique_labels(detections: Sequence[Detection]) -> list[str]:
    labels: list[str] = []
    for detection in detections:
        if detection.label not in labels:
            labels.append(detection.label)
    return labels


def _no_match_reason(nouns: Sequence[str], kept: Sequence[Detection]) -> str:
    if not nouns:
        return "the global caption names no known object"
    if not kept:
        return "no detection was kept"
    labels = ", ".join(_unique_labels(kept))
    return f"no kept detection ({labels}) matches a noun of the global caption"
