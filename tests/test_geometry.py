"""Box arithmetic checked against numbers computed by hand."""

from __future__ import annotations

import pytest

from patch_matters_core.geometry import (
    clip_box,
    fraction_inside,
    intersection_area,
    iou,
    merge_overlapping,
    normalized_box,
    quadrants,
    spatial_patches,
    union_all,
    union_box,
    whole_image,
)
from patch_matters_core.types import BOTTOM_LEFT, BOTTOM_RIGHT, TOP_LEFT, TOP_RIGHT, Box


def test_intersection_area_partial_overlap():
    # Overlap is [5, 5, 10, 10]: 5 x 5.
    assert intersection_area(Box(0, 0, 10, 10), Box(5, 5, 15, 15)) == 25.0


def test_intersection_area_touching_edges_is_zero():
    assert intersection_area(Box(0, 0, 10, 10), Box(10, 0, 20, 10)) == 0.0


def test_iou_partial_overlap():
    # 25 / (100 + 100 - 25) = 1/7.
    assert iou(Box(0, 0, 10, 10), Box(5, 5, 15, 15)) == pytest.approx(1 / 7)


def test_iou_identical_and_disjoint():
    assert iou(Box(2, 3, 7, 9), Box(2, 3, 7, 9)) == pytest.approx(1.0)
    assert iou(Box(0, 0, 1, 1), Box(5, 5, 6, 6)) == 0.0


def test_iou_contained_box():
    # 4 x 4 inside 10 x 10: 16 / 100.
    assert iou(Box(0, 0, 10, 10), Box(3, 3, 7, 7)) == pytest.approx(0.16)


def test_iou_zero_area_boxes():
    assert iou(Box(1, 1, 1, 1), Box(1, 1, 1, 1)) == 0.0
    assert iou(Box(0, 0, 10, 10), Box(5, 5, 5, 8)) == 0.0


def test_union_box_and_union_all():
    assert union_box(Box(0, 5, 10, 10), Box(3, 0, 4, 20)) == Box(0, 0, 10, 20)
    assert union_all([Box(1, 1, 2, 2), Box(5, 0, 6, 1), Box(0, 3, 1, 4)]) == Box(0, 0, 6, 4)


def test_union_all_rejects_empty_input():
    with pytest.raises(ValueError, match="at least one box"):
        union_all([])


def test_fraction_inside_own_area():
    # Box 10 x 10, the region covers its left 3 columns: 30 / 100.
    assert fraction_inside(Box(0, 0, 10, 10), Box(-5, -5, 3, 20)) == pytest.approx(0.3)
    assert fraction_inside(Box(2, 2, 4, 4), Box(0, 0, 10, 10)) == pytest.approx(1.0)
    assert fraction_inside(Box(2, 2, 2, 4), Box(0, 0, 10, 10)) == 0.0


def test_clip_box_inside_partial_and_outside():
    assert clip_box(Box(10, 10, 20, 20), 100, 50) == Box(10, 10, 20, 20)
    assert clip_box(Box(-5, -10, 120, 60), 100, 50) == Box(0, 0, 100, 50)
    outside = clip_box(Box(150, 10, 200, 20), 100, 50)
    assert outside.area == 0.0
    assert 0 <= outside.x0 <= 100


def test_merge_overlapping_pair_above_threshold():
    # IoU = 50 / 150 = 1/3 > 0.3.
    merged = merge_overlapping([Box(0, 0, 10, 10), Box(5, 0, 15, 10)], 0.3)
    assert merged == [Box(0, 0, 15, 10)]


def test_merge_overlapping_keeps_pair_at_threshold():
    # IoU = 60 / 140 = 3/7. The comparison is strict, so a threshold of exactly 3/7 keeps both.
    boxes = [Box(0, 0, 10, 10), Box(4, 0, 14, 10)]
    assert merge_overlapping(boxes, 3 / 7) == boxes
    assert merge_overlapping(boxes, 0.42) == [Box(0, 0, 14, 10)]


def test_merge_overlapping_chain_collapses():
    # A-B: IoU 50 / 150 = 1/3 > 0.3, merged into [0, 0, 15, 10]. That union and C share
    # 6 x 10 = 60 of 190: IoU 0.316 > 0.3, merged again.
    a, b, c = Box(0, 0, 10, 10), Box(5, 0, 15, 10), Box(9, 0, 19, 10)
    assert merge_overlapping([a, b, c], 0.3) == [Box(0, 0, 19, 10)]


def test_merge_overlapping_chain_through_union_only():
    # C overlaps A and B alone by IoU 100 / 450 = 0.22 each, below 0.3. Once A and B are
    # merged (IoU 1/3), their union [0, 0, 15, 10] lies inside C: IoU 150 / 450 = 0.33.
    a, b, c = Box(0, 0, 10, 10), Box(5, 0, 15, 10), Box(0, 0, 15, 30)
    assert iou(a, c) < 0.3
    assert iou(b, c) < 0.3
    assert merge_overlapping([a, b, c], 0.3) == [Box(0, 0, 15, 30)]


def test_merge_overlapping_union_stays_apart():
    # A-B: IoU 60 / 140 = 0.43, merged into [0, 0, 14, 10]. That union and C share
    # 2 x 10 = 20 of 220: IoU 0.09, so C stays apart at 0.3 and joins at 0.05.
    a, b, c = Box(0, 0, 10, 10), Box(4, 0, 14, 10), Box(12, 0, 22, 10)
    assert merge_overlapping([a, b, c], 0.3) == [Box(0, 0, 14, 10), c]
    assert merge_overlapping([a, b, c], 0.05) == [Box(0, 0, 22, 10)]


def test_merge_overlapping_deterministic_order():
    boxes = [Box(50, 50, 60, 60), Box(0, 0, 10, 10), Box(1, 0, 11, 10), Box(80, 0, 90, 5)]
    first = merge_overlapping(boxes, 0.3)
    assert first == merge_overlapping(list(boxes), 0.3)
    assert first == [Box(50, 50, 60, 60), Box(0, 0, 11, 10), Box(80, 0, 90, 5)]


def test_merge_overlapping_empty():
    assert merge_overlapping([], 0.3) == []


def test_quadrants_even_size():
    parts = quadrants(640, 480)
    assert parts[TOP_LEFT] == Box(0, 0, 320, 240)
    assert parts[TOP_RIGHT] == Box(320, 0, 640, 240)
    assert parts[BOTTOM_LEFT] == Box(0, 240, 320, 480)
    assert parts[BOTTOM_RIGHT] == Box(320, 240, 640, 480)


def test_quadrants_odd_size_split_at_floor_half():
    parts = quadrants(427, 641)
    assert parts[TOP_LEFT] == Box(0, 0, 213, 320)
    assert parts[BOTTOM_RIGHT] == Box(213, 320, 427, 641)


def test_quadrants_one_pixel_image():
    parts = quadrants(1, 1)
    for name in (TOP_LEFT, TOP_RIGHT, BOTTOM_LEFT, BOTTOM_RIGHT):
        assert parts[name] == Box(0, 0, 1, 1)


def test_quadrants_thin_strip():
    parts = quadrants(2000, 3)
    assert parts[TOP_LEFT] == Box(0, 0, 1000, 1)
    assert parts[TOP_RIGHT] == Box(1000, 0, 2000, 1)
    assert parts[BOTTOM_LEFT] == Box(0, 1, 1000, 3)
    assert parts[BOTTOM_RIGHT] == Box(1000, 1, 2000, 3)
    for box in parts.values():
        assert box.area > 0


def test_quadrants_reject_empty_image():
    with pytest.raises(ValueError, match="at least 1x1"):
        quadrants(0, 10)


def test_spatial_patches_grow_above_threshold():
    # Object [70, 10, 170, 30] has 30 of its 100 columns left of x=100: fraction 0.3 in the
    # left quadrants, 0.7 in the right ones.
    exactly = Box(70, 10, 170, 30)
    patches = spatial_patches(200, 100, [exactly], 0.3)
    assert patches[TOP_LEFT] == Box(0, 0, 100, 50)
    assert patches[TOP_RIGHT] == Box(70, 0, 200, 50)
    assert patches[BOTTOM_LEFT] == Box(0, 50, 100, 100)
    assert patches[BOTTOM_RIGHT] == Box(100, 50, 200, 100)

    # One more column inside the left half: fraction 0.31 > 0.3, the top-left grows.
    above = Box(69, 10, 169, 30)
    patches = spatial_patches(200, 100, [above], 0.3)
    assert patches[TOP_LEFT] == Box(0, 0, 169, 50)
    assert patches[TOP_RIGHT] == Box(69, 0, 200, 50)


def test_spatial_patches_centred_object():
    # A centred 100 x 100 object lies 25% in each quadrant: nothing grows at 0.3, all grow at 0.2.
    centre = Box(50, 50, 150, 150)
    plain = spatial_patches(200, 200, [centre], 0.3)
    assert plain == quadrants(200, 200)
    grown = spatial_patches(200, 200, [centre], 0.2)
    assert grown[TOP_LEFT] == Box(0, 0, 150, 150)
    assert grown[BOTTOM_RIGHT] == Box(50, 50, 200, 200)


def test_spatial_patches_non_square_image():
    objects = [Box(10, 10, 40, 60), Box(250, 5, 290, 30), Box(120, 80, 180, 99)]
    first = spatial_patches(301, 100, objects, 0.3)
    second = spatial_patches(301, 100, list(reversed(objects)), 0.3)
    assert first == second
    # Split at (150, 50); the first object is fully top-left, reaching y=60.
    assert first[TOP_LEFT] == Box(0, 0, 150, 60)
    # The second is fully top-right, inside it already.
    assert first[TOP_RIGHT] == Box(150, 0, 301, 50)
    # The third straddles x=150 evenly and lies in the bottom half: both bottom quadrants grow.
    assert first[BOTTOM_LEFT] == Box(0, 50, 180, 100)
    assert first[BOTTOM_RIGHT] == Box(120, 50, 301, 100)


def test_spatial_patches_clip_to_image():
    patches = spatial_patches(100, 100, [Box(-20, -20, 30, 30)], 0.3)
    assert patches[TOP_LEFT] == Box(0, 0, 50, 50)


def test_spatial_patches_one_pixel_and_thin_images():
    single = spatial_patches(1, 1, [Box(0, 0, 1, 1)], 0.3)
    assert all(box == Box(0, 0, 1, 1) for box in single.values())
    thin = spatial_patches(2000, 3, [Box(900, 0, 1300, 3)], 0.3)
    # 100 of 400 columns left of x=1000 (0.25) keep the left quadrants; the right ones contain
    # 0.75 of the object, and the top ones contain one of its three rows (0.33 x 0.75 = 0.25).
    assert thin[TOP_LEFT] == Box(0, 0, 1000, 1)
    assert thin[BOTTOM_RIGHT] == Box(900, 0, 2000, 3)
    assert thin[TOP_RIGHT] == Box(1000, 0, 2000, 1)


def test_whole_image_and_normalized_box():
    assert whole_image(640, 480) == Box(0, 0, 640, 480)
    assert normalized_box(Box(160, 120, 640, 480), 640, 480) == [0.25, 0.25, 1.0, 1.0]
    assert normalized_box(Box(-10, 0, 700, 240), 640, 480, digits=3) == [0.0, 0.0, 1.0, 0.5]


def test_normalized_box_rejects_empty_image():
    with pytest.raises(ValueError, match="positive"):
        normalized_box(Box(0, 0, 1, 1), 0, 10)
