"""End-to-end runs of the ``patch-matters`` command on real photographs with real model files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from patch_matters_core.types import SPATIAL_PATCH_NAMES, Trace

pytestmark = pytest.mark.slow

# Keeps each model call short: the tiny models produce noise up to the limit.
MAX_NEW_TOKENS = "40"


def run_cli(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run(
        [sys.executable, "-m", "patch_matters_core", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def assert_trace_complete(trace: Trace, num_samples: int = 3, scored: bool = True) -> None:
    names = [patch.name for patch in trace.patches]
    for name in (*SPATIAL_PATCH_NAMES, "semantic"):
        assert name in names, f"patch {name} missing from {names}"

    described = [patch.name for patch in trace.patches if patch.described and patch.name != "global"]
    for name in described:
        assert len(trace.descriptions[name]) == num_samples, f"{name} has {trace.descriptions[name]!r}"
    assert len(trace.descriptions["global"]) == 1

    patch_statements = [s for s in trace.statements if not s.patch.startswith("pair:")]
    assert patch_statements, "no statements were produced"
    if scored:
        assert any(s.score is not None for s in trace.statements), "no statement was scored"

    final = [level for level in trace.levels if level.level == 3]
    assert len(final) == 1
    for name in described:
        assert name in final[0].covers, f"final level does not cover {name}"
    for name in SPATIAL_PATCH_NAMES:
        assert name in final[0].covers, f"final level does not cover {name}"

    assert trace.caption.strip()
    assert set(trace.timings) >= {"divide", "describe", "filter", "aggregate", "total"}
    assert trace.models["vlm"].source


@pytest.fixture(scope="module")
def two_images(coco_images) -> list[str]:
    return [str(entry["path"]) for entry in coco_images[:2]]


def test_caption_qwen_smollm2_owlv2_blip(tmp_path, tiny_models, smollm2_gguf, two_images):
    trace_dir = tmp_path / "traces"
    result = run_cli(
        "caption",
        *two_images,
        "--vlm", str(tiny_models / "vlm-qwen2_5_vl"),
        "--llm", str(smollm2_gguf),
        "--detector", str(tiny_models / "det-owlv2"),
        "--scorer", str(tiny_models / "itm-blip"),
        "--max-new-tokens", MAX_NEW_TOKENS,
        "--trace", str(trace_dir),
    )
    assert result.returncode == 0, result.stderr

    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert len(lines) == 2
    for image, line in zip(two_images, lines):
        assert line.startswith(f"{image}: ")

    for image in two_images:
        trace = Trace.load(trace_dir / f"{Path(image).stem}.json")
        assert_trace_complete(trace)
        assert trace.models["llm"].source.endswith(".gguf")
        assert trace.image.path == image


@pytest.mark.parametrize(
    ("vlm", "detector", "scorer"),
    [
        ("vlm-llava", "det-grounding-dino", "itm-clip"),
        ("vlm-smolvlm", "det-owlv2", "itm-siglip"),
    ],
)
def test_caption_other_families(tmp_path, tiny_models, two_images, vlm, detector, scorer):
    trace_file = tmp_path / "trace.json"
    result = run_cli(
        "caption",
        two_images[0],
        "--vlm", str(tiny_models / vlm),
        "--detector", str(tiny_models / detector),
        "--scorer", str(tiny_models / scorer),
        "--max-new-tokens", MAX_NEW_TOKENS,
        "--trace", str(trace_file),
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()

    trace = Trace.load(trace_file)
    assert_trace_complete(trace)
    assert "text only" in trace.models["llm"].family


def test_caption_without_detector_and_scorer(tmp_path, tiny_models, two_images):
    trace_file = tmp_path / "trace.json"
    result = run_cli(
        "caption",
        two_images[1],
        "--vlm", str(tiny_models / "vlm-qwen2_5_vl"),
        "--detector", "none",
        "--scorer", "none",
        "--max-new-tokens", MAX_NEW_TOKENS,
        "--trace", str(trace_file),
    )
    assert result.returncode == 0, result.stderr

    trace = Trace.load(trace_file)
    assert_trace_complete(trace, scored=False)
    stages = {fallback.stage for fallback in trace.fallbacks}
    assert "divide" in stages
    assert "filter" in stages
    assert trace.models["detector"].source is None


def test_caption_missing_hub_model_explains_fix(tmp_path, shared_data):
    image = shared_data / "coco" / "000000248856.jpg"
    result = run_cli("caption", str(image), "--vlm", "example-org/not-downloaded-vlm", "--detector", "none")
    assert result.returncode == 2
    assert "example-org/not-downloaded-vlm" in result.stderr
    assert "Traceback" not in result.stderr


def test_caption_bad_image_fails_alone(tmp_path, tiny_models, shared_data, two_images):
    bad = shared_data / "bad_images" / "truncated.jpg"
    result = run_cli(
        "caption",
        str(bad),
        two_images[0],
        "--vlm", str(tiny_models / "vlm-qwen2_5_vl"),
        "--detector", "none",
        "--scorer", "none",
        "--max-new-tokens", "16",
    )
    assert result.returncode == 1
    assert "truncated.jpg" in result.stderr
    assert result.stdout.startswith(f"{two_images[0]}: ")
    assert "truncated.jpg" not in result.stdout


def test_batch_bad_images_then_resume(tmp_path, tiny_models, shared_data):
    folder = tmp_path / "bad_images"
    shutil.copytree(shared_data / "bad_images", folder)
    args = [
        "batch",
        str(folder),
        "--vlm", str(tiny_models / "vlm-qwen2_5_vl"),
        "--detector", "none",
        "--scorer", "none",
        "--samples", "2",
        "--max-new-tokens", "16",
    ]

    first = run_cli(*args)
    assert first.returncode == 1, first.stderr

    unreadable = {"truncated.jpg", "not_an_image.jpg", "empty.png"}
    for image in folder.iterdir():
        if image.suffix == ".txt":
            continue
        caption_file = image.with_suffix(".txt")
        if image.name in unreadable:
            assert not caption_file.exists(), f"{image.name} got a caption file"
            assert image.name in first.stderr
        else:
            assert caption_file.exists(), f"{image.name} has no caption file: {first.stderr}"
            text = caption_file.read_text(encoding="utf-8")
            assert text.strip()
            assert "error" not in text.lower()

    written = {path.name: path.stat().st_mtime_ns for path in folder.glob("*.txt")}
    second = run_cli(*args)
    assert second.returncode == 1
    assert f"{len(written)} skipped" in second.stdout
    for name, mtime in written.items():
        assert (folder / name).stat().st_mtime_ns == mtime, f"{name} was rewritten"


def test_trace_file_is_valid_json(tmp_path, tiny_models, two_images):
    trace_file = tmp_path / "one.json"
    result = run_cli(
        "caption",
        two_images[0],
        "--vlm", str(tiny_models / "vlm-qwen2_5_vl"),
        "--detector", "none",
        "--scorer", "none",
        "--samples", "1",
        "--max-new-tokens", "16",
        "--trace", str(trace_file),
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(trace_file.read_text(encoding="utf-8"))
    for key in ("image", "patches", "descriptions", "statements", "levels", "fallbacks", "models", "timings", "caption"):
        assert key in data
