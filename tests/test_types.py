"""JSON round trips of the data model and the configuration."""

from __future__ import annotations

import json

from patch_matters_core.config import PipelineConfig
from patch_matters_core.types import (
    Box,
    Detection,
    Fallback,
    ImageInfo,
    LevelText,
    ModelInfo,
    Patch,
    Statement,
    Trace,
    pair_name,
)


def make_trace() -> Trace:
    return Trace(
        image=ImageInfo(path="photo é.jpg", sha256="ab" * 32, width=640, height=480),
        patches=[Patch("global", Box(0, 0, 640, 480)), Patch("semantic", Box(10, 20, 300, 400), described=False)],
        descriptions={"global": ["A dog."], "top_left": ["A dog.", "A brown dog.", ""]},
        statements=[
            Statement("top_left", "A dog.", "consistent", kept=True, source_patch="top_left", sample_index=0),
            Statement("top_left", "A red ball.", "unique", score=0.12, kept=False, sample_index=2),
        ],
        levels=[LevelText(3, "final", ["global", "top_left"], "A brown dog.", Box(0, 0, 640, 480))],
        fallbacks=[Fallback("divide", None, "no detector")],
        models={"vlm": ModelInfo("vlm", "models/qwen", "qwen2_5_vl", "float32", "cpu")},
        timings={"total": 1.5},
        caption="A brown dog.",
        detections=[Detection("dog", 0.9, Box(1, 2, 3, 4))],
        sorting={"top_left": "llm"},
        config=PipelineConfig().to_dict(),
    )


def test_trace_round_trip():
    trace = make_trace()
    assert Trace.from_json(trace.to_json()) == trace


def test_trace_save_and_load(tmp_path):
    trace = make_trace()
    path = tmp_path / "trace.json"
    trace.save(path)
    assert Trace.load(path) == trace
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["patches"][0] == {"name": "global", "box": [0.0, 0.0, 640.0, 480.0], "described": True}
    assert data["statements"][1]["score"] == 0.12


def test_config_round_trip():
    config = PipelineConfig(seed=7).with_samples(5).with_max_new_tokens(64)
    assert PipelineConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_pair_name():
    assert pair_name("top_left", "top_right") == "pair:top_left+top_right"
