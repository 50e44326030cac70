"""Describe stage: request building, sample indexing and fallbacks, with a scripted VLM."""

from __future__ import annotations

from PIL import Image

from patch_matters_core.config import DescribeConfig
from patch_matters_core.models.base import Generation
from patch_matters_core.stages.describe import describe
from patch_matters_core.types import Box, ModelInfo, Patch, PatchSet


class EchoVLM:
    """Return for each request the crop size and a running number, to trace where it lands."""

    info = ModelInfo(role="vlm", source="echo")
    min_side = 28

    def __init__(self, answers: dict[int, str] | None = None) -> None:
        self.calls: list[int] = []
        self.answers = answers or {}
        self.count = 0

    def describe(self, requests, settings, seed=None, progress=None):
        self.calls.append(len(requests))
        generations = []
        for request in requests:
            text = self.answers.get(self.count, f"crop {request.image.width}x{request.image.height} #{self.count}")
            generations.append(Generation(text=text, raw=text, hit_token_limit=self.count == 1))
            self.count += 1
        if progress:
            progress("describe")
        return generations


def make_patches(width: int = 200, height: int = 100) -> PatchSet:
    patches = [
        Patch("global", Box(0, 0, width, height)),
        Patch("semantic", Box(10, 10, 60, 40), described=False),
        Patch("top_left", Box(0, 0, 100, 50)),
        Patch("top_right", Box(100, 0, 200, 50)),
        Patch("bottom_left", Box(0, 50, 100, 100)),
        Patch("bottom_right", Box(100, 50, 200, 100)),
    ]
    return PatchSet(width=width, height=height, patches=patches)


def test_describe_indexes_samples_by_patch():
    image = Image.new("RGB", (200, 100), "white")
    vlm = EchoVLM()
    descriptions = describe(image, make_patches(), vlm, DescribeConfig(num_samples=3), seed=1)

    assert vlm.calls == [1, 12]
    assert descriptions.samples["global"] == ["crop 200x100 #0"]
    assert "semantic" not in descriptions.samples
    for offset, name in enumerate(["top_left", "top_right", "bottom_left", "bottom_right"]):
        numbers = [int(text.split("#")[1]) for text in descriptions.samples[name]]
        assert numbers == [1 + 3 * offset, 2 + 3 * offset, 3 + 3 * offset]


def test_describe_batch_size_splits_calls():
    image = Image.new("RGB", (200, 100), "white")
    vlm = EchoVLM()
    describe(image, make_patches(), vlm, DescribeConfig(num_samples=2, batch_size=3), global_description="given")
    assert vlm.calls == [3, 3, 2]


def test_describe_records_unusable_samples():
    image = Image.new("RGB", (200, 100), "white")
    vlm = EchoVLM(answers={2: "", 3: "I'm sorry, I cannot help with that."})
    progress_labels: list[str] = []
    descriptions = describe(
        image, make_patches(), vlm, DescribeConfig(num_samples=3), progress=progress_labels.append
    )

    assert descriptions.samples["top_left"][1] == ""
    assert descriptions.samples["top_left"][2] == ""
    reasons = [fallback.reason for fallback in descriptions.fallbacks]
    assert any("no usable text" in reason for reason in reasons)
    assert any("declined" in reason for reason in reasons)
    assert any("max_new_tokens" in reason for reason in reasons)
    assert progress_labels == ["describe", "describe"]


def test_describe_raises_tiny_crops_to_min_side():
    image = Image.new("RGB", (2000, 3), "white")
    patches = PatchSet(
        width=2000,
        height=3,
        patches=[Patch("global", Box(0, 0, 2000, 3)), Patch("top_left", Box(0, 0, 1000, 1))],
    )
    vlm = EchoVLM()
    descriptions = describe(image, patches, vlm, DescribeConfig(num_samples=1), global_description="g")
    width, height = descriptions.samples["top_left"][0].split()[1].split("x")
    assert int(height) >= 28
    assert int(width) >= 28


def test_pad_to_aspect_ratio_thin_strips():
    from patch_matters_core.stages.describe import pad_to_aspect_ratio

    wide = pad_to_aspect_ratio(Image.new("RGB", (2000, 3), "white"), 50)
    assert wide.size == (2000, 40)
    assert wide.getpixel((0, 0)) == (128, 128, 128)
    assert wide.getpixel((1000, 20)) == (255, 255, 255)

    tall = pad_to_aspect_ratio(Image.new("RGB", (3, 2000), "white"), 50)
    assert tall.size == (40, 2000)

    square = Image.new("RGB", (64, 64))
    assert pad_to_aspect_ratio(square, 50) is square
