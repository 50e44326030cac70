"""Box arithmetic for the divide and aggregate stages, in pixels of the original image.

Every function takes and returns ``types.Box`` values and is pure Python. A box whose
``x1 <= x0`` or ``y1 <= y0`` has zero area; such boxes never count as overlapping anything.
"""

from __future__ import annotations

from typing import Iterable, Sequence

from .types import BOTTOM_LEFT, BOTTOM_RIGHT, TOP_LEFT, TOP_RIGHT, Box


def intersection_area(first: Box, second: Box) -> float:
    """Return the area shared by two boxes, 0.0 when they do not overlap."""
    width = min(first.x1, second.x1) - max(first.x0, second.x0)
    height = min(first.y1, second.y1) - max(first.y0, second.y0)
    if width <= 0 or height <= 0:
        return 0.0
    return width * height


def iou(first: Box, second: Box) -> float:
    """Return the intersection over union of two boxes, 0.0 when the union is empty."""
    shared = intersection_area(first, second)
    union_area = first.area + second.area - shared
    if union_area <= 0:
        return 0.0
    return shared / union_area


def union_box(first: Box, second: Box) -> Box:
    """Return the smallest box that contains both boxes."""
    return Box(
        min(first.x0, second.x0),
        min(first.y0, second.y0),
        max(first.x1, second.x1),
        max(first.y1, second.y1),
    )


def union_all(boxes: Iterable[Box]) -> Box:
    """Return the smallest box that contains every box; raise ValueError for no boxes."""
    result: Box | None = None
    for box in boxes:
        result = box if result is None else union_box(result, box)
    if result is None:
        raise ValueError("union_all needs at least one box, got none.")
    return result


def fraction_inside(box: Box, region: Box) -> float:
    """Return the fraction of ``box``'s own area that lies inside ``region`` (0.0 for an empty box)."""
    if box.area <= 0:
        return 0.0
    return intersection_area(box, region) / box.area


def clip_box(box: Box, width: float, height: float) -> Box:
    """Clip a box to the image ``[0, 0, width, height]``.

    A box entirely outside the image becomes a zero-area box on the image border; callers
    check ``area`` to drop it.
    """
    x0 = min(max(box.x0, 0.0), float(width))
    y0 = min(max(box.y0, 0.0), float(height))
    x1 = min(max(box.x1, 0.0), float(width))
    y1 = min(max(box.y1, 0.0), float(height))
    return Box(x0, y0, max(x0, x1), max(y0, y1))


def whole_image(width: float, height: float) -> Box:
    """Return the box of the whole image."""
    return Box(0.0, 0.0, float(width), float(height))


def merge_overlapping(boxes: Sequence[Box], iou_threshold: float) -> list[Box]:
    """Replace any two boxes whose IoU is above ``iou_threshold`` by their union, until none are.

    Pairs are visited in input order: the first pair ``(i, j)`` with ``i < j`` that overlaps
    enough is merged, the union takes position ``i``, box ``j`` is removed, and the search
    restarts. The result therefore depends only on the input order. A union can overlap a box
    that neither of its parts overlapped, so chains A-B-C collapse into one box.
    """
    merged = list(boxes)
    while True:
        pair = _first_overlapping_pair(merged, iou_threshold)
        if pair is None:
            return merged
        first, second = pair
        merged[first] = union_box(merged[first], merged[second])
        del merged[second]


def _first_overlapping_pair(boxes: list[Box], iou_threshold: float) -> tuple[int, int] | None:
    for first in range(len(boxes)):
        for second in range(first + 1, len(boxes)):
            if iou(boxes[first], boxes[second]) > iou_threshold:
                return first, second
    return None


def quadrants(width: int, height: int) -> dict[str, Box]:
    """Split the image at ``(width // 2, height // 2)`` into four quadrants, keyed by patch name.

    An image side of 1 pixel cannot be split, so along that side both halves span the whole
    side: a 1x1 image yields four 1x1 quadrants, and a 2000x3 image splits its height at row 1.
    """
    if width < 1 or height < 1:
        raise ValueError(f"Image size must be at least 1x1 pixels, got {width}x{height}.")

    split_x = width // 2
    split_y = height // 2
    left = (0.0, float(split_x)) if width >= 2 else (0.0, float(width))
    right = (float(split_x), float(width)) if width >= 2 else (0.0, float(width))
    top = (0.0, float(split_y)) if height >= 2 else (0.0, float(height))
    bottom = (float(split_y), float(height)) if height >= 2 else (0.0, float(height))

    return {
        TOP_LEFT: Box(left[0], top[0], left[1], top[1]),
        TOP_RIGHT: Box(right[0], top[0], right[1], top[1]),
        BOTTOM_LEFT: Box(left[0], bottom[0], left[1], bottom[1]),
        BOTTOM_RIGHT: Box(right[0], bottom[0], right[1], bottom[1]),
    }


def spatial_patches(
    width: int,
    height: int,
    objects: Sequence[Box],
    overlap_threshold: float,
) -> dict[str, Box]:
    """Return the four spatial patches: quadrants grown around the objects that lie mostly inside them.

    A quadrant grows to the union of itself and every object box whose own area lies inside
    the quadrant by a fraction above ``overlap_threshold``. The fraction is measured against
    the original quadrant, not the grown one, so the result does not depend on the order of
    ``objects``. Grown patches are clipped to the image and may overlap each other.
    """
    result: dict[str, Box] = {}
    for name, quadrant in quadrants(width, height).items():
        grown = quadrant
        for box in objects:
            if fraction_inside(box, quadrant) > overlap_threshold:
                grown = union_box(grown, box)
        result[name] = clip_box(grown, width, height)
    return result


def normalized_box(box: Box, width: float, height: float, digits: int = 2) -> list[float]:
    """Return ``[x0, y0, x1, y1]`` divided by the image size, clipped to 0..1 and rounded.

    This is the form in which prompts give a region's location.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"Image size must be positive, got {width}x{height}.")
    values = (box.x0 / width, box.y0 / height, box.x1 / width, box.y1 / height)
    return [round(min(max(value, 0.0), 1.0), digits) for value in values]
