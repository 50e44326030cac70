"""Divide stage rules, checked with a scripted detector, and object-noun extraction."""

from __future__ import annotations

import logging
from typing import Sequence

import pytest
from PIL import Image

from patch_matters_core.config import DivideConfig
from patch_matters_core.geometry import iou, quadrants, union_all
from patch_matters_core.images import load_image
from patch_matters_core.models.base import Detector
from patch_matters_core.stages.divide import divide
from patch_matters_core.types import (
    BOTTOM_LEFT,
    BOTTOM_RIGHT,
    GLOBAL,
    SEMANTIC,
    SPATIAL_PATCH_NAMES,
    TOP_LEFT,
    TOP_RIGHT,
    Box,
    Detection,
    ModelInfo,
    PatchSet,
)
from patch_matters_core.vocabulary import COCO_CLASSES, extract_object_nouns, nouns_match, singularize

CONFIG = DivideConfig()


class ScriptedDetector:
    """Detector that returns fixed detections and records the labels it was queried with."""

    def __init__(self, detections: Sequence[Detection] = (), error: Exception | None = None):
        self.info = ModelInfo(role="detector", source="scripted-detector")
        self.detections = list(detections)
        self.error = error
        self.queries: list[list[str]] = []

    def detect(self, image: Image.Image, labels: Sequence[str]) -> list[Detection]:
        self.queries.append(list(labels))
        if self.error is not None:
            raise self.error
        return list(self.detections)


def detection(label: str, score: float, box: Sequence[float]) -> Detection:
    return Detection(label=label, score=score, box=Box.from_list(list(box)))


def blank(width: int = 200, height: int = 100) -> Image.Image:
    return Image.new("RGB", (width, height), (120, 120, 120))


def test_scripted_detector_fits_protocol():
    assert isinstance(ScriptedDetector(), Detector)


def test_queries_caption_nouns():
    detector = ScriptedDetector()
    divide(blank(), "Two men walk their dogs past a red car and some trees.", detector, CONFIG)
    assert detector.queries == [["man", "dog", "car", "tree"]]


def test_caption_without_nouns_queries_coco_classes():
    detector = ScriptedDetector([detection("cat", 0.9, [10, 10, 30, 30])])
    result = divide(blank(), "It is very bright and quite pleasant.", detector, CONFIG)
    assert detector.queries == [list(COCO_CLASSES)]
    assert len(detector.queries[0]) == 80
    reasons = [f.reason for f in result.fallbacks if f.patch is None]
    assert any("80 COCO class names" in reason for reason in reasons)
    # Nothing in the caption can match, so the semantic patch falls back to the whole image.
    assert result.get(SEMANTIC).box == Box(0, 0, 200, 100)
    assert result.matched_labels == []


def test_patch_names_and_order():
    result = divide(blank(), "a dog", ScriptedDetector([detection("dog", 0.9, [10, 10, 40, 40])]), CONFIG)
    assert [p.name for p in result.patches] == [GLOBAL, SEMANTIC, *SPATIAL_PATCH_NAMES]
    assert result.get(GLOBAL).box == Box(0, 0, 200, 100)
    assert result.get(GLOBAL).described is True
    assert (result.width, result.height) == (200, 100)
    assert result.global_caption == "a dog"


def test_threshold_is_strict():
    detections = [
        detection("dog", 0.9, [0, 0, 10, 10]),
        detection("dog", 0.31, [20, 0, 30, 10]),
        detection("dog", 0.3, [40, 0, 50, 10]),
        detection("dog", 0.1, [60, 0, 70, 10]),
    ]
    result = divide(blank(), "a dog", ScriptedDetector(detections), CONFIG)
    assert [d.score for d in result.detections] == [0.9, 0.31]
    assert result.fallbacks == []


def test_none_above_threshold_keeps_two_best():
    detections = [
        detection("dog", 0.05, [0, 0, 10, 10]),
        detection("cat", 0.2, [20, 0, 30, 10]),
        detection("dog", 0.25, [40, 0, 50, 10]),
    ]
    result = divide(blank(), "a dog and a cat", ScriptedDetector(detections), CONFIG)
    assert [d.score for d in result.detections] == [0.25, 0.2]
    fallback = [f for f in result.fallbacks if f.patch is None]
    assert len(fallback) == 1
    assert "kept the 2 best" in fallback[0].reason


def test_single_weak_detection_uses_whole_image():
    result = divide(blank(), "a dog", ScriptedDetector([detection("dog", 0.1, [0, 0, 10, 10])]), CONFIG)
    assert result.detections == []
    assert result.merged_objects == [Box(0, 0, 200, 100)]
    assert any("whole image is the only object" in f.reason for f in result.fallbacks)
    for name, box in quadrants(200, 100).items():
        assert result.get(name).box == box


def test_no_detections_uses_whole_image():
    result = divide(blank(), "a dog", ScriptedDetector([]), CONFIG)
    assert result.detections == []
    assert result.merged_objects == [Box(0, 0, 200, 100)]
    assert any("found no object" in f.reason for f in result.fallbacks)
    semantic = result.get(SEMANTIC)
    assert semantic.box == Box(0, 0, 200, 100)
    assert semantic.described is False
    assert any(f.patch == SEMANTIC for f in result.fallbacks)


def test_overlapping_detections_merge():
    # IoU of the two dogs: 50 / 150 = 1/3 > 0.3.
    detections = [
        detection("dog", 0.9, [10, 10, 20, 20]),
        detection("dog", 0.8, [15, 10, 25, 20]),
        detection("cat", 0.7, [150, 60, 190, 90]),
    ]
    result = divide(blank(), "a dog and a cat", ScriptedDetector(detections), CONFIG)
    assert result.merged_objects == [Box(10, 10, 25, 20), Box(150, 60, 190, 90)]
    assert len(result.detections) == 3


def test_spatial_patches_grow_around_objects():
    # Image 200 x 100 splits at (100, 50). The bus [60, 10, 140, 40] lies half in each top
    # quadrant, so both grow to cover it; the cat sits in the bottom-right quadrant.
    detections = [detection("bus", 0.9, [60, 10, 140, 40]), detection("cat", 0.8, [150, 60, 190, 90])]
    result = divide(blank(), "a bus and a cat", ScriptedDetector(detections), CONFIG)
    assert result.get(TOP_LEFT).box == Box(0, 0, 140, 50)
    assert result.get(TOP_RIGHT).box == Box(60, 0, 200, 50)
    assert result.get(BOTTOM_LEFT).box == Box(0, 50, 100, 100)
    assert result.get(BOTTOM_RIGHT).box == Box(100, 50, 200, 100)


def test_semantic_patch_is_union_of_matched_labels():
    detections = [
        detection("dog", 0.9, [10, 10, 30, 30]),
        detection("frisbee", 0.8, [40, 20, 50, 30]),
        detection("tree", 0.95, [150, 0, 200, 100]),
    ]
    caption = "A dog jumps for a frisbee."
    result = divide(blank(), caption, ScriptedDetector(detections), CONFIG)
    assert result.matched_labels == ["dog", "frisbee"]
    assert result.get(SEMANTIC).box == Box(10, 10, 50, 30)
    assert result.get(SEMANTIC).described is True


def test_semantic_matching_plural_and_synonym():
    # A detector that returns COCO names or plurals still matches the caption's words.
    detections = [detection("person", 0.9, [0, 0, 20, 40]), detection("dogs", 0.9, [30, 0, 50, 20])]
    result = divide(blank(), "Two men and their dog.", ScriptedDetector(detections), CONFIG)
    assert result.matched_labels == ["person", "dogs"]
    assert result.get(SEMANTIC).box == Box(0, 0, 50, 40)


def test_semantic_no_match_falls_back_to_whole_image():
    result = divide(blank(), "a dog", ScriptedDetector([detection("kite", 0.9, [0, 0, 20, 20])]), CONFIG)
    semantic = result.get(SEMANTIC)
    assert semantic.box == Box(0, 0, 200, 100)
    assert semantic.described is False
    semantic_fallbacks = [f for f in result.fallbacks if f.patch == SEMANTIC]
    assert len(semantic_fallbacks) == 1
    assert semantic_fallbacks[0].stage == "divide"
    assert "kite" in semantic_fallbacks[0].reason


def test_semantic_described_only_below_iou_limit():
    # 100 x 80 of 200 x 100 is IoU 0.4 exactly: not described. One column less: described.
    at_limit = divide(blank(), "a dog", ScriptedDetector([detection("dog", 0.9, [0, 0, 100, 80])]), CONFIG)
    assert iou(at_limit.get(SEMANTIC).box, Box(0, 0, 200, 100)) == 0.4
    assert at_limit.get(SEMANTIC).described is False

    below = divide(blank(), "a dog", ScriptedDetector([detection("dog", 0.9, [0, 0, 99, 80])]), CONFIG)
    assert below.get(SEMANTIC).described is True


def test_no_detector_gives_plain_quadrants():
    result = divide(blank(301, 99), "a dog", None, CONFIG)
    assert [p.name for p in result.patches] == [GLOBAL, SEMANTIC, *SPATIAL_PATCH_NAMES]
    for name, box in quadrants(301, 99).items():
        assert result.get(name).box == box
        assert result.get(name).described is True
    assert result.get(SEMANTIC).box == Box(0, 0, 301, 99)
    assert result.get(SEMANTIC).described is False
    assert len(result.fallbacks) == 1
    assert result.fallbacks[0].patch is None
    assert result.fallbacks[0].reason.startswith("no detector")


def test_detector_error_propagates():
    detector = ScriptedDetector(error=RuntimeError("out of memory"))
    with pytest.raises(RuntimeError, match="out of memory"):
        divide(blank(), "a dog", detector, CONFIG)


def test_boxes_clipped_and_empty_dropped(caplog):
    detections = [
        detection("dog", 0.9, [-20, -10, 50, 40]),
        detection("dog", 0.9, [250, 10, 300, 40]),
        detection("dog", 0.9, [60, 30, 60, 50]),
    ]
    with caplog.at_level(logging.WARNING, logger="patch_matters_core.stages.divide"):
        result = divide(blank(), "a dog", ScriptedDetector(detections), CONFIG)
    assert [d.box for d in result.detections] == [Box(0, 0, 50, 40)]
    dropped = [r for r in caplog.records if "dropped detection" in r.getMessage()]
    assert len(dropped) == 2


def test_progress_called_after_detector():
    calls: list[str] = []
    detector = ScriptedDetector([detection("dog", 0.9, [0, 0, 10, 10])])
    divide(blank(), "a dog", detector, CONFIG, progress=calls.append)
    assert calls == ["divide"]


def test_progress_error_cancels():
    def cancel(label: str) -> None:
        raise KeyboardInterrupt(label)

    with pytest.raises(KeyboardInterrupt):
        divide(blank(), "a dog", ScriptedDetector(), CONFIG, progress=cancel)


def test_logs_start_and_end(caplog):
    with caplog.at_level(logging.INFO, logger="patch_matters_core.stages.divide"):
        divide(blank(), "a dog", ScriptedDetector([detection("dog", 0.9, [0, 0, 10, 10])]), CONFIG)
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert any("querying detector scripted-detector with 1 labels" in m for m in messages)
    assert any("kept 1 of 1 detections" in m for m in messages)


def test_patchset_round_trips_through_json():
    detections = [detection("dog", 0.9, [10, 10, 30, 30]), detection("cat", 0.2, [50, 50, 60, 60])]
    result = divide(blank(), "a dog and a cat", ScriptedDetector(detections), CONFIG)
    assert PatchSet.from_dict(result.to_dict()) == result


def test_custom_config_values_apply():
    config = DivideConfig(detection_threshold=0.5, fallback_detections=3, merge_iou=0.9)
    detections = [
        detection("dog", 0.4, [10, 10, 20, 20]),
        detection("dog", 0.45, [15, 10, 25, 20]),
        detection("dog", 0.3, [100, 60, 120, 80]),
    ]
    result = divide(blank(), "a dog", ScriptedDetector(detections), config)
    assert [d.score for d in result.detections] == [0.45, 0.4, 0.3]
    # IoU 1/3 is below 0.9, so the overlapping pair stays apart.
    assert len(result.merged_objects) == 3


def test_reference_boxes_on_coco_images(coco_images):
    assert len(coco_images) == 24
    for entry in coco_images:
        image = load_image(entry["path"])
        width, height = image.size
        assert (width, height) == (entry["width"], entry["height"])

        nouns = extract_object_nouns(entry["global_caption_llava16"])
        assert nouns, entry["file"]
        reference_boxes = [entry["reference_semantic_patch"], *entry["reference_spatial_patches"]]
        detections = [detection(nouns[0], 0.9, entry["reference_semantic_patch"])]
        detections += [detection("unmentioned thing", 0.5, box) for box in entry["reference_spatial_patches"]]
        detector = ScriptedDetector(detections)

        # The reference pipeline split at (width // 2, height // 2) too: each of its spatial
        # patches contains the quadrant of the same name.
        for name, reference in zip(SPATIAL_PATCH_NAMES, entry["reference_spatial_patches"]):
            quadrant = quadrants(width, height)[name]
            assert reference[0] <= quadrant.x0, (entry["file"], name)
            assert reference[1] <= quadrant.y0, (entry["file"], name)
            assert reference[2] >= quadrant.x1, (entry["file"], name)
            assert reference[3] >= quadrant.y1, (entry["file"], name)

        result = divide(image, entry["global_caption_llava16"], detector, CONFIG)
        assert detector.queries == [nouns]
        _check_spatial_patches(result, entry["file"])

        semantic = result.get(SEMANTIC).box
        expected_semantic = Box(
            max(0.0, reference_boxes[0][0]),
            max(0.0, reference_boxes[0][1]),
            min(float(width), reference_boxes[0][2]),
            min(float(height), reference_boxes[0][3]),
        )
        assert semantic == expected_semantic, entry["file"]
        expected_described = iou(semantic, Box(0, 0, width, height)) < CONFIG.semantic_max_iou
        assert result.get(SEMANTIC).described is expected_described


def _check_spatial_patches(result: PatchSet, file_name: str) -> None:
    """Check that the spatial patches lie in the image, contain their quadrant and cover the image."""
    width, height = result.width, result.height
    plain = quadrants(width, height)
    corners = {
        TOP_LEFT: (0.0, 0.0),
        TOP_RIGHT: (float(width), 0.0),
        BOTTOM_LEFT: (0.0, float(height)),
        BOTTOM_RIGHT: (float(width), float(height)),
    }
    spatial = [result.get(name) for name in SPATIAL_PATCH_NAMES]
    assert [p.name for p in result.patches[2:]] == list(SPATIAL_PATCH_NAMES), file_name

    for patch in spatial:
        box = patch.box
        assert 0 <= box.x0 < box.x1 <= width, (file_name, patch.name, box)
        assert 0 <= box.y0 < box.y1 <= height, (file_name, patch.name, box)
        quadrant = plain[patch.name]
        assert box.x0 <= quadrant.x0, (file_name, patch.name)
        assert box.y0 <= quadrant.y0, (file_name, patch.name)
        assert box.x1 >= quadrant.x1, (file_name, patch.name)
        assert box.y1 >= quadrant.y1, (file_name, patch.name)
        corner_x, corner_y = corners[patch.name]
        assert box.x0 <= corner_x <= box.x1, (file_name, patch.name)
        assert box.y0 <= corner_y <= box.y1, (file_name, patch.name)

    # Each patch contains its quadrant, so together they cover every pixel.
    assert union_all(p.box for p in spatial) == Box(0, 0, width, height), file_name


def test_extract_object_nouns_rules():
    nouns = extract_object_nouns(
        "An orange cat sits on a glass table beside a teddy bear; two oranges, lime green "
        "T-shirts and three knives lie nearby. You can see the sky."
    )
    assert nouns == ["cat", "table", "teddy bear", "orange", "t-shirt", "knife", "sky"]


def test_extract_object_nouns_word_boundaries():
    assert extract_object_nouns("The cathedral and the category.") == []
    assert extract_object_nouns("") == []


def test_singularize_and_match():
    assert singularize("boxes") == "box"
    assert singularize("berries") == "berry"
    assert singularize("women") == "woman"
    assert singularize("bus") == "bus"
    assert singularize("glasses") == "glasses"
    assert nouns_match("person", ["woman"])
    assert nouns_match("Sofas", ["couch"])
    assert not nouns_match("cat", ["dog"])
