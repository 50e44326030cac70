"""Image-text matching scorers on tiny random-weight BLIP ITM, CLIP and SigLIP models.

The weights are random, so these tests check counts, ranges, order and truncation, never
whether a score is right about a text and the image.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from PIL import Image

from patch_matters_core.errors import ModelLoadError
from patch_matters_core.models.base import Scorer
from patch_matters_core.models.scorer import ImageTextScorer, load_scorer, scorer_family

sys.path.insert(0, str(Path(__file__).resolve().parent / "fixtures"))

from tiny_vision import build_blip_itm, build_clip, build_owlv2, build_siglip  # noqa: E402

FAMILIES = ("blip", "clip", "siglip")
STATEMENTS = [
    "A person is holding a camera.",
    "There is a slice of toast on a wooden cutting board.",
    "Two dogs play in the snow.",
    "A knife with a black handle lies next to the board.",
]
# About 300 words, far beyond the 64 text positions of the tiny models.
LONG_STATEMENT = " ".join(["the wooden cutting board holds a piece of toast with banana and mint"] * 25)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny_scorers")
    build_blip_itm(out / "itm-blip")
    build_clip(out / "itm-clip")
    build_siglip(out / "itm-siglip")
    return out


@pytest.fixture(scope="module")
def scorers(model_dir) -> dict[str, ImageTextScorer]:
    return {family: load_scorer(str(model_dir / f"itm-{family}"), device="cpu") for family in FAMILIES}


@pytest.fixture(params=FAMILIES)
def scorer(request, scorers) -> ImageTextScorer:
    scorer = scorers[request.param]
    scorer.batch_size = 32
    return scorer


@pytest.fixture(scope="module")
def coco_image(coco_images) -> Image.Image:
    with Image.open(coco_images[0]["path"]) as image:
        return image.convert("RGB")


def assert_scores(scores, count: int) -> None:
    assert len(scores) == count
    for value in scores:
        assert type(value) is float
        assert 0.0 <= value <= 1.0


def test_scorer_protocol_and_info(scorer):
    assert isinstance(scorer, Scorer)
    assert scorer.info.role == "scorer"
    assert scorer.info.family == scorer.family
    assert scorer.info.device == "cpu"
    assert scorer.info.dtype == "float32"


def test_default_thresholds(scorers):
    assert scorers["blip"].default_threshold == 0.3
    assert scorers["clip"].default_threshold == 0.2
    assert scorers["siglip"].default_threshold == 0.1


def test_score_range_and_count(scorer, coco_image):
    scores = scorer.score(coco_image, STATEMENTS)

    assert_scores(scores, len(STATEMENTS))


def test_score_order_follows_texts(scorer, coco_image):
    forward = scorer.score(coco_image, STATEMENTS)
    backward = scorer.score(coco_image, list(reversed(STATEMENTS)))

    assert list(reversed(backward)) == pytest.approx(forward, abs=1e-5)


def test_score_batches_match_one_pass(scorer, coco_image):
    one_pass = scorer.score(coco_image, STATEMENTS)
    scorer.batch_size = 3
    batched = scorer.score(coco_image, STATEMENTS)

    assert batched == pytest.approx(one_pass, abs=1e-5)


def test_score_empty_list(scorer, coco_image):
    assert scorer.score(coco_image, []) == []


def test_score_empty_text_is_zero(scorer, coco_image):
    scores = scorer.score(coco_image, ["", STATEMENTS[0], "   "])

    assert_scores(scores, 3)
    assert scores[0] == 0.0
    assert scores[2] == 0.0
    assert scores[1] == pytest.approx(scorer.score(coco_image, [STATEMENTS[0]])[0], abs=1e-5)


def test_score_long_text_truncated(scorer, coco_image):
    assert len(LONG_STATEMENT.split()) >= 300
    scores = scorer.score(coco_image, [LONG_STATEMENT, STATEMENTS[0]])

    assert_scores(scores, 2)


def test_text_token_limits(scorers):
    # The BLIP tokenizer allows 512 tokens but its text tower has 64 positions.
    assert scorers["blip"].max_text_tokens == 64
    assert scorers["clip"].max_text_tokens == 77
    assert scorers["siglip"].max_text_tokens == 64


def test_score_grayscale_image(scorer):
    image = Image.new("L", (50, 120), 128)

    assert_scores(scorer.score(image, STATEMENTS[:2]), 2)


def test_score_string_rejected(scorer, coco_image):
    with pytest.raises(TypeError, match="list of strings"):
        scorer.score(coco_image, "a cat")


def test_load_scorer_cached(model_dir, scorers):
    assert load_scorer(str(model_dir / "itm-clip"), device="cpu") is scorers["clip"]


def test_load_scorer_unknown_family(tmp_path):
    folder = build_owlv2(tmp_path / "owlv2")

    with pytest.raises(ModelLoadError) as error:
        load_scorer(str(folder), device="cpu")

    message = str(error.value)
    assert "owlv2" in message
    assert "BLIP" in message
    assert "CLIP" in message
    assert "SigLIP" in message


def test_blip_without_itm_head_rejected():
    from transformers import BlipConfig

    config = BlipConfig(architectures=["BlipForConditionalGeneration"])

    with pytest.raises(ModelLoadError, match="BlipForImageTextRetrieval"):
        scorer_family(config)


def test_released_scorer_raises(model_dir, coco_image):
    scorer = load_scorer(str(model_dir / "itm-blip"), device="cpu", dtype="bfloat16")
    assert_scores(scorer.score(coco_image, STATEMENTS[:1]), 1)
    scorer.release()

    with pytest.raises(ModelLoadError, match="released"):
        scorer.score(coco_image, STATEMENTS[:1])
