"""Zero-shot detector backends on tiny random-weight OWLv2 and Grounding DINO models.

The weights are random, so these tests check boxes, labels, counts and ranges, never
whether a box finds the object it names.
"""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

import pytest
from PIL import Image

from patch_matters_core.errors import ModelLoadError
from patch_matters_core.images import BACKGROUND_RGB, load_image
from patch_matters_core.models.base import Detector
from patch_matters_core.models.detector import (
    MIN_DETECTOR_SIDE,
    ZeroShotDetector,
    _grounding_chunks,
    _grounding_prompt,
    _label_token_positions,
    detections_to_original,
    load_detector,
    prepare_detector_image,
    relative_boxes_to_pixels,
)
from patch_matters_core.types import Box, Detection

sys.path.insert(0, str(Path(__file__).resolve().parent / "fixtures"))

from tiny_vision import build_clip, build_grounding_dino, build_owlv2  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny_detectors")
    build_owlv2(out / "det-owlv2")
    build_grounding_dino(out / "det-grounding-dino")
    return out


@pytest.fixture(scope="module")
def owlv2(model_dir) -> ZeroShotDetector:
    return load_detector(str(model_dir / "det-owlv2"), device="cpu")


@pytest.fixture(scope="module")
def grounding_dino(model_dir) -> ZeroShotDetector:
    return load_detector(str(model_dir / "det-grounding-dino"), device="cpu")


@pytest.fixture(params=["owlv2", "grounding_dino"])
def detector(request) -> ZeroShotDetector:
    detector = request.getfixturevalue(request.param)
    detector.max_detections = 100
    detector.owl_queries_per_call = 32
    return detector


@pytest.fixture(scope="module")
def coco_image(coco_images) -> Image.Image:
    with Image.open(coco_images[0]["path"]) as image:
        return image.convert("RGB")


def synthetic_image(width: int, height: int) -> Image.Image:
    image = Image.new("RGB", (width, height), (40, 90, 160))
    for x in range(0, width, 7):
        for y in range(0, height, 5):
            image.putpixel((x, y), ((x * 3) % 256, (y * 5) % 256, 200))
    return image


def assert_inside(detections, image: Image.Image) -> None:
    for detection in detections:
        box = detection.box
        assert 0.0 <= box.x0 < box.x1 <= image.width, box
        assert 0.0 <= box.y0 < box.y1 <= image.height, box


# Conversion of relative boxes to pixels, with hand-computed numbers.


def test_padded_square_wide_image():
    # A 200x100 image is padded at the bottom to 200x200, so one relative unit is 200 px.
    boxes = relative_boxes_to_pixels([[0.5, 0.25, 0.5, 0.5]], 200, 100, padded_square=True)

    assert boxes == [Box(50.0, 0.0, 150.0, 100.0)]


def test_padded_square_tall_image():
    # A 100x200 image is padded at the right to 200x200.
    boxes = relative_boxes_to_pixels([[0.25, 0.5, 0.2, 0.3]], 100, 200, padded_square=True)

    assert boxes[0] == pytest.approx(Box(30.0, 70.0, 70.0, 130.0))


def test_padded_square_box_in_padding_dropped():
    # y from 130 to 170 px lies in the padding below a 100 px tall image.
    boxes = relative_boxes_to_pixels([[0.5, 0.75, 0.2, 0.2]], 200, 100, padded_square=True)

    assert boxes == [None]


def test_padded_square_box_clipped_to_image():
    # x from 150 to 250 px crosses the right edge of the 200 px wide image.
    boxes = relative_boxes_to_pixels([[1.0, 0.25, 0.5, 0.1]], 200, 100, padded_square=True)

    assert boxes == [Box(150.0, 40.0, 200.0, 60.0)]


def test_relative_to_image_not_square():
    boxes = relative_boxes_to_pixels([[0.5, 0.25, 0.5, 0.5]], 200, 100, padded_square=False)

    assert boxes == [Box(50.0, 0.0, 150.0, 50.0)]


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        # 300x90 is padded to 300x300: 75 px cells centred at 75, 150, 225 and 300 px.
        (
            (300, 90),
            [[37.5, 37.5, 112.5, 90.0], [112.5, 37.5, 187.5, 90.0], [187.5, 37.5, 262.5, 90.0], [262.5, 37.5, 300.0, 90.0]],
        ),
        # 90x300 is padded to 300x300 on the right.
        (
            (90, 300),
            [[37.5, 37.5, 90.0, 112.5], [37.5, 112.5, 90.0, 187.5], [37.5, 187.5, 90.0, 262.5], [37.5, 262.5, 90.0, 300.0]],
        ),
    ],
)
def test_owlv2_grid_boxes_in_pixels(owlv2, size, expected):
    # The tiny OWLv2 predicts one grid cell per patch of its 4x4 grid over the padded square.
    owlv2.max_detections = None
    detections = owlv2.detect(synthetic_image(*size), ["dog"])

    boxes = sorted(d.box.to_list() for d in detections)
    assert len(boxes) == len(expected)
    for box, expected_box in zip(boxes, expected):
        assert box == pytest.approx(expected_box, abs=0.1)


def test_owlv2_boxes_match_processor_postprocessing(owlv2):
    import torch

    image = synthetic_image(150, 90)
    inputs = owlv2.processor(images=image, text=[["a cat"]], return_tensors="pt")
    with torch.inference_mode():
        outputs = owlv2.model(**inputs)

    ours = relative_boxes_to_pixels(outputs.pred_boxes[0].tolist(), 150, 90, padded_square=True)
    reference = owlv2.processor.post_process_grounded_object_detection(
        outputs, threshold=0.0, target_sizes=[(90, 150)]
    )[0]["boxes"]

    assert len(ours) == len(reference)
    for box, (x0, y0, x1, y1) in zip(ours, reference.tolist()):
        clipped = (min(max(x0, 0), 150), min(max(y0, 0), 90), min(max(x1, 0), 150), min(max(y1, 0), 90))
        if box is None:
            assert clipped[2] <= clipped[0] or clipped[3] <= clipped[1]
        else:
            assert box.to_list() == pytest.approx(list(clipped), abs=1e-3)


# Detection on real and synthetic images.


def test_detector_protocol_and_info(detector):
    assert isinstance(detector, Detector)
    assert detector.info.role == "detector"
    assert detector.info.family in ("owlv2", "grounding-dino")
    assert detector.info.device == "cpu"
    assert detector.info.dtype == "float32"


def test_detect_coco_image(detector, coco_image):
    labels = ["person", "camera", "wooden table"]
    detections = detector.detect(coco_image, labels)

    assert detections
    assert_inside(detections, coco_image)
    assert {d.label for d in detections} <= set(labels)
    for detection in detections:
        assert type(detection.score) is float
        assert 0.0 <= detection.score <= 1.0
    scores = [d.score for d in detections]
    assert scores == sorted(scores, reverse=True)


@pytest.mark.parametrize("size", [(300, 90), (90, 300)])
def test_detect_non_square_image(detector, size):
    image = synthetic_image(*size)
    detections = detector.detect(image, ["dog", "bicycle"])

    assert detections
    assert_inside(detections, image)


def test_detect_small_image(detector):
    # Random weights may put every box of so small an image outside it, so the list may be empty.
    image = synthetic_image(37, 41)
    detections = detector.detect(image, ["dog", "bicycle"])

    assert_inside(detections, image)
    assert {d.label for d in detections} <= {"dog", "bicycle"}


def test_detect_grayscale_image(detector):
    image = synthetic_image(120, 80).convert("L")
    detections = detector.detect(image, ["dog"])

    assert_inside(detections, image)
    assert {d.label for d in detections} == {"dog"}


def test_detect_empty_labels(detector, coco_image):
    assert detector.detect(coco_image, []) == []


def test_detect_blank_labels_skipped(detector, coco_image, caplog):
    with caplog.at_level("WARNING"):
        detections = detector.detect(coco_image, ["", "   "])

    assert detections == []
    assert "empty detector label" in caplog.text


def test_grounding_dino_period_label_skipped(grounding_dino, coco_image, caplog):
    with caplog.at_level("WARNING"):
        detections = grounding_dino.detect(coco_image, ["...", "dog"])

    assert "'...'" in caplog.text
    assert {d.label for d in detections} == {"dog"}


def test_detect_string_labels_rejected(detector, coco_image):
    with pytest.raises(TypeError, match="list of strings"):
        detector.detect(coco_image, "dog")


def test_detect_max_detections(detector, coco_image):
    detector.max_detections = 3
    detections = detector.detect(coco_image, ["dog", "cat"])

    assert len(detections) == 3


def test_grounding_dino_labels_as_given(grounding_dino, coco_image):
    labels = ["Red Car.", "  black   DOG ", "red car"]
    detections = grounding_dino.detect(coco_image, labels)

    # "red car" repeats "Red Car." once lowercased and stripped of the period, so it is not queried again.
    assert {d.label for d in detections} <= {"Red Car.", "black DOG"}
    assert detections


def test_grounding_prompt_spans():
    from patch_matters_core.models.detector import _Label

    prompt, spans = _grounding_prompt([_Label("Red Car", "red car"), _Label("dog", "dog")])

    assert prompt == "red car. dog."
    assert [prompt[start:end] for start, end in spans] == ["red car", "dog"]


def test_grounding_label_token_positions(grounding_dino):
    from patch_matters_core.models.detector import _Label

    chunk = [_Label("a red car", "a red car"), _Label("dog", "dog"), _Label("zebra crossing", "zebra crossing")]
    prompt, spans = _grounding_prompt(chunk)
    encoding = grounding_dino.processor.tokenizer(prompt, return_offsets_mapping=True)
    positions = _label_token_positions(encoding["offset_mapping"], spans)

    tokens = encoding.tokens()
    assert [tokens[i] for i in positions[0]] == ["a", "red", "car"]
    assert [tokens[i] for i in positions[1]] == ["dog"]
    # "zebra" and "crossing" are not in the tiny vocabulary and split into word pieces.
    assert len(positions[2]) > 2
    flat = [i for found in positions for i in found]
    assert len(flat) == len(set(flat))


def test_grounding_chunks_fit_token_limit(grounding_dino):
    from patch_matters_core.models.detector import _Label

    tokenizer = grounding_dino.processor.tokenizer
    queries = [_Label(f"object number {i}", f"object number {i}") for i in range(60)]
    chunks = _grounding_chunks(queries, tokenizer, max_tokens=64)

    assert len(chunks) > 1
    assert [q for chunk in chunks for q in chunk] == queries
    for chunk in chunks:
        prompt, _ = _grounding_prompt(chunk)
        assert len(tokenizer(prompt)["input_ids"]) <= 64


def test_grounding_dino_long_label_list(grounding_dino, coco_image):
    # About 7 tokens per label: 60 labels need more than the 256-token text of one pass.
    labels = [f"thing {i}" for i in range(60)]
    grounding_dino.max_detections = None
    detections = grounding_dino.detect(coco_image, labels)

    num_queries = grounding_dino.model.config.num_queries
    assert num_queries < len(detections) <= 2 * num_queries
    assert {d.label for d in detections} <= set(labels)
    assert_inside(detections, coco_image)


def test_owl_chunked_labels_match_single_pass(owlv2, coco_image):
    labels = ["person", "camera", "table", "knife", "toast"]
    owlv2.max_detections = None
    owlv2.owl_queries_per_call = 32
    single = owlv2.detect(coco_image, labels)
    owlv2.owl_queries_per_call = 2
    chunked = owlv2.detect(coco_image, labels)

    assert [d.label for d in chunked] == [d.label for d in single]
    assert [d.box for d in chunked] == [d.box for d in single]
    assert [d.score for d in chunked] == pytest.approx([d.score for d in single], abs=1e-5)


def test_owl_long_label_truncated(owlv2, coco_image, caplog):
    long_label = " ".join(["a very long label about a wooden kitchen table"] * 4)
    with caplog.at_level("WARNING"):
        detections = owlv2.detect(coco_image, [long_label, "dog"])

    assert "reads only the first 16" in caplog.text
    assert {d.label for d in detections} <= {long_label, "dog"}


# Loading.


def test_load_detector_cached(model_dir, owlv2):
    assert load_detector(str(model_dir / "det-owlv2"), device="cpu") is owlv2


def test_load_detector_unknown_family(tmp_path):
    folder = build_clip(tmp_path / "clip")

    with pytest.raises(ModelLoadError) as error:
        load_detector(str(folder), device="cpu")

    message = str(error.value)
    assert "'clip'" in message
    assert "OWLv2" in message
    assert "Grounding DINO" in message


def test_load_detector_missing_folder(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_detector(str(tmp_path / "no-such-model"), device="cpu")


def test_released_detector_raises(model_dir, coco_image):
    detector = load_detector(str(model_dir / "det-grounding-dino"), device="cpu", dtype="bfloat16")
    detections = detector.detect(coco_image, ["dog"])
    assert detector.info.dtype == "bfloat16"
    assert_inside(detections, coco_image)
    detector.release()

    with pytest.raises(ModelLoadError, match="released"):
        detector.detect(coco_image, ["dog"])
    assert load_detector(str(model_dir / "det-grounding-dino"), device="cpu", dtype="bfloat16") is not detector


# Images too small or too long for the processors: upscaled and padded, boxes mapped back.


class _RecordHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def transformers_warnings():
    """Messages that transformers logs at WARNING or above during the test.

    transformers' root logger does not propagate to the root logger, so caplog misses them.
    """
    handler = _RecordHandler()
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    yield handler.messages
    logger.removeHandler(handler)


@pytest.mark.parametrize(
    "size", [(1, 1), (2000, 3), (3, 2000), (2, 40), (5, 5)], ids=["1x1", "2000x3", "3x2000", "2x40", "5x5"]
)
def test_detect_degenerate_sizes(detector, size, transformers_warnings):
    image = synthetic_image(*size)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        detections = detector.detect(image, ["dog", "bicycle"])

    assert_inside(detections, image)
    assert {d.label for d in detections} <= {"dog", "bicycle"}
    assert not [m for m in transformers_warnings if "channel dimension is ambiguous" in m]
    assert not [w for w in caught if "channel dimension" in str(w.message)]


def test_detect_thin_file(detector, shared_data, transformers_warnings):
    image = load_image(shared_data / "bad_images" / "thin_2000x3.png")
    assert image.size == (2000, 3)

    detections = detector.detect(image, ["line"])

    assert_inside(detections, image)
    assert not [m for m in transformers_warnings if "ambiguous" in m]


def test_small_image_boxes_match_prepared_image(detector):
    # Detecting on a small image equals detecting on the prepared image and scaling back.
    detector.max_detections = None
    image = synthetic_image(20, 12)
    prepared, scale_x, scale_y = prepare_detector_image(image)
    assert min(prepared.size) >= MIN_DETECTOR_SIDE

    direct = detector.detect(image, ["dog"])
    on_prepared = detector.detect(prepared, ["dog"])
    expected = detections_to_original(on_prepared, scale_x, scale_y, image.width, image.height)

    assert direct
    assert len(direct) == len(expected)
    direct.sort(key=lambda d: d.box.to_list())
    expected.sort(key=lambda d: d.box.to_list())
    for got, want in zip(direct, expected):
        assert got.box.to_list() == pytest.approx(want.box.to_list(), abs=1e-4)
        assert got.score == pytest.approx(want.score, abs=1e-5)


@pytest.mark.parametrize("size", [(32, 32), (300, 90), (256, 32), (640, 480)])
def test_prepare_keeps_normal_image(size):
    image = synthetic_image(*size)
    prepared, scale_x, scale_y = prepare_detector_image(image)
    assert prepared is image
    assert (scale_x, scale_y) == (1.0, 1.0)


@pytest.mark.parametrize(
    ("size", "prepared_size", "scaled_size"),
    [
        ((1, 1), (32, 32), (32, 32)),
        ((16, 8), (64, 32), (64, 32)),
        ((3, 2000), (250, 2000), (3, 2000)),
        ((2000, 3), (2000, 250), (2000, 3)),
        ((500, 4), (1024, 128), (1024, 8)),
        ((400, 40), (400, 50), (400, 40)),
    ],
)
def test_prepare_upscales_and_pads(size, prepared_size, scaled_size):
    image = synthetic_image(*size)
    prepared, scale_x, scale_y = prepare_detector_image(image)

    assert prepared.size == prepared_size
    assert (round(size[0] * scale_x), round(size[1] * scale_y)) == scaled_size
    assert prepared.mode == "RGB"
    # The padding is mid-grey at the bottom right; the image content stays at the top left.
    if scaled_size != prepared_size:
        assert prepared.getpixel((prepared_size[0] - 1, prepared_size[1] - 1)) == BACKGROUND_RGB


def test_prepared_boxes_map_back_exactly():
    image = synthetic_image(10, 3)
    prepared, scale_x, scale_y = prepare_detector_image(image)
    scaled_width, scaled_height = round(10 * scale_x), round(3 * scale_y)
    assert prepared.size == (scaled_width, max(32, scaled_height))

    whole = Detection("a", 0.9, Box(0.0, 0.0, float(scaled_width), float(scaled_height)))
    part = Detection("b", 0.8, Box(scale_x * 2, scale_y * 1, scale_x * 5, scale_y * 2))
    overlapping_padding = Detection("c", 0.7, Box(0.0, 0.0, float(prepared.width), float(prepared.height)))
    in_padding = Detection("d", 0.6, Box(0.0, scaled_height + 1.0, 5.0, float(prepared.height)))

    mapped = detections_to_original([whole, part, overlapping_padding, in_padding], scale_x, scale_y, 10, 3)

    assert [d.label for d in mapped] == ["a", "b", "c"]
    assert mapped[0].box.to_list() == pytest.approx([0.0, 0.0, 10.0, 3.0], abs=1e-9)
    assert mapped[1].box.to_list() == pytest.approx([2.0, 1.0, 5.0, 2.0], abs=1e-9)
    assert mapped[2].box.to_list() == pytest.approx([0.0, 0.0, 10.0, 3.0], abs=1e-9)
    assert mapped[1].score == 0.8
