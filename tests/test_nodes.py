"""ComfyUI nodes without ComfyUI: node contracts, and every node run on IMAGE tensors with tiny models."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from comfyui_helpers import ROOT, image_tensor, import_pack, pack_module

from patch_matters_core.errors import ModelLoadError
from patch_matters_core.models import loading
from patch_matters_core.types import (
    Box,
    Descriptions,
    FilteredDescriptions,
    FilteredSet,
    Patch,
    PatchSet,
    Statement,
)

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN"}
LINK_TYPES = {"IMAGE", "PM_VLM", "PM_LLM", "PM_DETECTOR", "PM_SCORER", "PM_PATCHES", "PM_DESCRIPTIONS", "PM_FILTERED"}


@pytest.fixture(scope="module")
def pack():
    return import_pack()


@pytest.fixture(scope="module")
def nodes(pack):
    return {name: cls() for name, cls in pack.NODE_CLASS_MAPPINGS.items()}


@pytest.fixture(autouse=True)
def empty_model_cache():
    loading.release_models()
    yield
    loading.release_models()


@pytest.fixture(scope="module")
def photos(shared_data, coco_images) -> list[Path]:
    return [entry["path"] for entry in coco_images[:2]]


def select(nodes, loader: str, folder: Path | str, **settings):
    """Run a loader node with a path in its free-text field; return its handle."""
    node = nodes[loader]
    arguments = {"model": "none", "hub_id_or_path": str(folder), "device": "cpu", "dtype": "float32",
                 "keep_loaded": False}
    if loader == "PatchMattersVLMLoader":
        arguments["attention"] = "auto"
    arguments.update(settings)
    (handle,) = node.select(**arguments)
    return handle


# ---------------------------------------------------------------------------------------------
# Import and node contracts


def test_pack_import_loads_no_models_or_torch():
    script = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('pack', {str(ROOT / '__init__.py')!r}, "
        f"submodule_search_locations=[{str(ROOT)!r}])\n"
        "module = importlib.util.module_from_spec(spec); sys.modules['pack'] = module\n"
        "spec.loader.exec_module(module)\n"
        "print(len(module.NODE_CLASS_MAPPINGS), 'torch' in sys.modules, 'transformers' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    count, torch_imported, transformers_imported = result.stdout.split()
    assert int(count) == 9
    assert torch_imported == "False"
    assert transformers_imported == "False"


def test_pack_exports_web_directory(pack):
    assert (ROOT / pack.WEB_DIRECTORY).is_dir()
    assert set(pack.NODE_DISPLAY_NAME_MAPPINGS) == set(pack.NODE_CLASS_MAPPINGS)


def _check_input(node_name: str, input_name: str, spec) -> None:
    where = f"{node_name}.{input_name}"
    kind = spec[0]
    options = spec[1] if len(spec) > 1 else {}
    assert isinstance(options.get("tooltip"), str) and options["tooltip"].strip(), f"{where} has no tooltip"
    if isinstance(kind, list):
        assert kind, f"{where} is an empty combo"
        assert all(isinstance(choice, str) for choice in kind), f"{where} has a non-string choice"
        if "default" in options:
            assert options["default"] in kind, f"{where} default is not a choice"
        return
    assert kind in WIDGET_TYPES | LINK_TYPES, f"{where} has unknown type {kind}"
    if kind in ("INT", "FLOAT"):
        default = options["default"]
        assert options["min"] <= default <= options["max"], f"{where} default {default} outside min/max"
        if kind == "INT":
            assert isinstance(default, int), f"{where} INT default is not an int"
    if kind == "BOOLEAN":
        assert isinstance(options["default"], bool), f"{where} BOOLEAN default is not a bool"
    if kind == "STRING":
        assert isinstance(options["default"], str), f"{where} STRING default is not a string"


def test_every_node_has_valid_contract(pack):
    for name, cls in pack.NODE_CLASS_MAPPINGS.items():
        inputs = cls.INPUT_TYPES()
        assert set(inputs) <= {"required", "optional", "hidden"}, name
        for section in ("required", "optional"):
            for input_name, spec in inputs.get(section, {}).items():
                _check_input(name, input_name, spec)

        assert isinstance(cls.DESCRIPTION, str) and len(cls.DESCRIPTION) > 40, name
        assert cls.CATEGORY.startswith("Patch Matters"), name
        assert callable(getattr(cls, cls.FUNCTION)), name
        assert len(cls.RETURN_TYPES) == len(cls.RETURN_NAMES), name
        assert len(cls.OUTPUT_TOOLTIPS) == len(cls.RETURN_TYPES), name
        if hasattr(cls, "OUTPUT_IS_LIST"):
            assert len(cls.OUTPUT_IS_LIST) == len(cls.RETURN_TYPES), name


def test_output_nodes_show_text(pack):
    output_nodes = {name for name, cls in pack.NODE_CLASS_MAPPINGS.items() if getattr(cls, "OUTPUT_NODE", False)}
    assert output_nodes == {"PatchMattersSemanticFilter", "PatchMattersHierarchicalAggregate", "PatchMattersCaption"}


# ---------------------------------------------------------------------------------------------
# Loaders


def test_loader_choices_list_local_models(pack, tiny_models, monkeypatch):
    monkeypatch.setenv("PATCH_MATTERS_MODEL_DIRS", str(tiny_models))
    classes = pack.NODE_CLASS_MAPPINGS

    vlm_choices = classes["PatchMattersVLMLoader"].INPUT_TYPES()["required"]["model"][0]
    detector_choices = classes["PatchMattersDetectorLoader"].INPUT_TYPES()["required"]["model"][0]
    scorer_choices = classes["PatchMattersScorerLoader"].INPUT_TYPES()["required"]["model"][0]

    assert {"vlm-qwen2_5_vl", "vlm-llava", "vlm-smolvlm"} <= set(vlm_choices)
    assert not any(name.startswith(("det-", "itm-")) for name in vlm_choices)
    assert detector_choices == ["none", "det-grounding-dino", "det-owlv2"]
    assert scorer_choices == ["none", "itm-blip", "itm-clip", "itm-siglip"]


def test_loader_choice_resolves_to_folder(nodes, tiny_models, monkeypatch):
    monkeypatch.setenv("PATCH_MATTERS_MODEL_DIRS", str(tiny_models))
    (handle,) = nodes["PatchMattersVLMLoader"].select("vlm-qwen2_5_vl", "", "cpu", "float32", "auto", True)
    assert handle.source == str(tiny_models / "vlm-qwen2_5_vl")
    assert handle.keep_loaded is True
    assert handle.role == "vlm"


def test_vlm_loader_without_model_raises(nodes, monkeypatch, tmp_path):
    monkeypatch.setenv("PATCH_MATTERS_MODEL_DIRS", str(tmp_path))
    placeholder = nodes["PatchMattersVLMLoader"].INPUT_TYPES()["required"]["model"][0][0]
    with pytest.raises(ModelLoadError, match="hub id or path"):
        nodes["PatchMattersVLMLoader"].select(placeholder, "", "cpu", "auto", "auto", False)


def test_llm_loader_same_as_vlm_needs_vlm(nodes):
    with pytest.raises(ValueError, match="no VLM is connected"):
        nodes["PatchMattersLLMLoader"].select("same as VLM", "", "auto", "auto", False)


def test_llm_loader_same_as_vlm_wraps_vlm(nodes, tiny_models):
    vlm = select(nodes, "PatchMattersVLMLoader", tiny_models / "vlm-qwen2_5_vl")
    (llm,) = nodes["PatchMattersLLMLoader"].select("same as VLM", "", "auto", "auto", True, vlm=vlm)
    assert llm.vlm == vlm
    assert llm.role == "llm"


def test_optional_loaders_return_none(nodes):
    for loader in ("PatchMattersDetectorLoader", "PatchMattersScorerLoader"):
        assert nodes[loader].select("none", "", "auto", "auto", False) == (None,)


def test_flash_attention_falls_back_to_sdpa(caplog):
    models = pack_module("nodes.models")
    if models.importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed, so there is no fallback to test")
    with caplog.at_level(logging.WARNING):
        assert models.attention_choice("flash_attention_2") == "sdpa"
    assert "flash-attn" in caplog.text
    assert models.attention_choice("auto") is None
    assert models.attention_choice("eager") == "eager"


# ---------------------------------------------------------------------------------------------
# Preview and report


def test_draw_patches_marks_every_box():
    from PIL import Image

    preview = pack_module("nodes.preview")
    patches = PatchSet(
        width=200,
        height=160,
        patches=[
            Patch("global", Box(0, 0, 200, 160)),
            Patch("semantic", Box(40, 30, 150, 120), described=False),
            Patch("top_left", Box(0, 0, 100, 80)),
            Patch("top_right", Box(100, 0, 200, 80)),
            Patch("bottom_left", Box(0, 80, 100, 160)),
            Patch("bottom_right", Box(100, 80, 200, 160)),
        ],
    )
    drawn = preview.draw_patches(Image.new("RGB", (200, 160), (0, 0, 0)), patches)

    assert drawn.size == (200, 160)
    # The lower edge of each box, away from labels, has the patch's colour.
    assert drawn.getpixel((120, 159)) == preview.PATCH_COLOURS["bottom_right"]
    assert drawn.getpixel((60, 159)) == preview.PATCH_COLOURS["bottom_left"]
    assert drawn.getpixel((95, 119)) == preview.PATCH_COLOURS["semantic"]
    assert drawn.getpixel((100, 100)) == (0, 0, 0)


def test_filter_report_lists_kept_and_dropped():
    report = pack_module("nodes.report")
    patches = PatchSet(width=10, height=10, patches=[Patch("top_left", Box(0, 0, 5, 5))])
    statements = [
        Statement("top_left", "A red car is parked.", "consistent", None, True),
        Statement("top_left", "A dog sleeps.", "unique", 0.12, False),
        Statement("top_left", "The car is red.", "contradictory", 0.61, True, group=1),
    ]
    filtered = FilteredDescriptions(
        descriptions=Descriptions(patches=patches, samples={"global": ["x"]}),
        sets={"top_left": FilteredSet("top_left", statements, "llm")},
    )
    text = report.filter_report(filtered, 0.3)

    assert "above 0.30" in text
    assert "top_left (sorted by the LLM): 2 kept, 1 dropped" in text
    kept_part, dropped_part = text.split(" dropped:")
    assert "A red car is parked." in kept_part
    assert "0.61  contradictory #1" in kept_part
    assert "0.12  unique" in dropped_part
    assert "A dog sleeps." in dropped_part


# ---------------------------------------------------------------------------------------------
# Nodes on tiny models


def test_step_by_step_nodes_on_batch_of_two(nodes, tiny_models, photos):
    vlm = select(nodes, "PatchMattersVLMLoader", tiny_models / "vlm-qwen2_5_vl")
    detector = select(nodes, "PatchMattersDetectorLoader", tiny_models / "det-owlv2")
    scorer = select(nodes, "PatchMattersScorerLoader", tiny_models / "itm-blip")
    batch = torch.cat([image_tensor(photos[0], 96, 64), image_tensor(photos[1], 96, 64)])

    patches, previews = nodes["PatchMattersDivide"].divide([batch], [detector], [0.3])
    assert len(patches) == 2
    assert [tuple(preview.shape) for preview in previews] == [(1, 64, 96, 3), (1, 64, 96, 3)]
    assert all(patch_set.width == 96 and patch_set.height == 64 for patch_set in patches)
    assert loading.cached_count() == 0

    described, global_captions = nodes["PatchMattersLocalDescribe"].describe(
        [batch], patches, [vlm], [2], [0.7], [0], [4], [""], [1]
    )
    assert len(described) == 2
    assert len(global_captions) == 2
    for item in described:
        for name in ("top_left", "top_right", "bottom_left", "bottom_right"):
            assert len(item.descriptions.samples[name]) == 2
    assert loading.cached_count() == 0

    filter_output = nodes["PatchMattersSemanticFilter"].filter(described, [scorer], [-1.0], [0], [16])
    filtered, reports = filter_output["result"]
    assert len(filtered) == 2
    assert filter_output["ui"]["text"] == reports
    assert all("kept" in report for report in reports)
    assert loading.cached_count() == 0

    aggregate_output = nodes["PatchMattersHierarchicalAggregate"].aggregate(filtered, [0.6], [0], [8], scorer=[scorer])
    (captions,) = aggregate_output["result"]
    assert len(captions) == 2
    assert all(isinstance(caption, str) and caption.strip() for caption in captions)
    assert aggregate_output["ui"]["text"] == captions
    assert loading.cached_count() == 0


def test_caption_node_on_images_of_different_sizes(nodes, tiny_models, photos):
    vlm = select(nodes, "PatchMattersVLMLoader", tiny_models / "vlm-qwen2_5_vl")
    scorer = select(nodes, "PatchMattersScorerLoader", tiny_models / "itm-clip")
    images = [image_tensor(photos[0], 80, 48), image_tensor(photos[1], 56, 72)]

    output = nodes["PatchMattersCaption"].caption(images, [vlm], [1], [0], [4], [0], scorer=[scorer])
    captions, traces = output["result"]

    assert len(captions) == 2
    assert output["ui"]["text"] == captions
    sizes = [(json.loads(trace)["image"]["width"], json.loads(trace)["image"]["height"]) for trace in traces]
    assert sizes == [(80, 48), (56, 72)]
    assert loading.cached_count() == 0


def test_describe_rejects_mismatched_image_count(nodes, tiny_models, photos):
    vlm = select(nodes, "PatchMattersVLMLoader", tiny_models / "vlm-qwen2_5_vl")
    image = image_tensor(photos[0], 64, 64)
    patches, _ = nodes["PatchMattersDivide"].divide([image], [None], [0.3])

    with pytest.raises(ValueError, match="2 image"):
        nodes["PatchMattersLocalDescribe"].describe(
            [torch.cat([image, image])], patches, [vlm], [1], [0.7], [0], [4], [""], [1]
        )


def test_missing_model_folder_is_a_node_error(nodes, tmp_path, photos):
    vlm = select(nodes, "PatchMattersVLMLoader", tmp_path / "no-such-model")
    image = image_tensor(photos[0], 64, 64)
    patches, _ = nodes["PatchMattersDivide"].divide([image], [None], [0.3])

    with pytest.raises(ModelLoadError, match="no-such-model"):
        nodes["PatchMattersLocalDescribe"].describe([image], patches, [vlm], [1], [0.7], [0], [4], [""], [1])


class RecordingBar:
    def __init__(self, total):
        self.updates = []

    def update_absolute(self, value, total=None):
        self.updates.append((value, total))


class Cancelled(Exception):
    pass


def test_progress_moves_after_every_model_call(nodes, tiny_models, photos, monkeypatch):
    bridge = pack_module("nodes.comfy_bridge")
    bars = []
    monkeypatch.setattr(bridge, "new_progress_bar", lambda total: bars.append(RecordingBar(total)) or bars[-1])
    vlm = select(nodes, "PatchMattersVLMLoader", tiny_models / "vlm-qwen2_5_vl")
    image = image_tensor(photos[0], 64, 64)
    patches, _ = nodes["PatchMattersDivide"].divide([image], [None], [0.3])

    nodes["PatchMattersLocalDescribe"].describe([image], patches, [vlm], [2], [0.7], [0], [4], [""], [1])

    describe_bar = bars[-1]
    # One global description plus 2 samples of 4 quadrants, one model call each, then the final update.
    assert [value for value, _ in describe_bar.updates[:-1]] == list(range(1, 10))
    final_value, final_total = describe_bar.updates[-1]
    assert final_value == final_total


def test_cancel_stops_within_one_model_call(nodes, tiny_models, photos, monkeypatch):
    bridge = pack_module("nodes.comfy_bridge")
    checks = []

    def interrupt_after_first_call():
        checks.append(1)
        raise Cancelled()

    monkeypatch.setattr(bridge, "check_interrupted", interrupt_after_first_call)
    vlm = select(nodes, "PatchMattersVLMLoader", tiny_models / "vlm-qwen2_5_vl")
    image = image_tensor(photos[0], 64, 64)
    patches, _ = nodes["PatchMattersDivide"].divide([image], [None], [0.3])
    checks.clear()

    with pytest.raises(Cancelled):
        nodes["PatchMattersLocalDescribe"].describe([image], patches, [vlm], [3], [0.7], [0], [4], [""], [1])

    assert len(checks) == 1
    assert loading.cached_count() == 0


def test_keep_loaded_keeps_model_cached(nodes, tiny_models, photos):
    image = image_tensor(photos[0], 64, 64)
    patches, _ = nodes["PatchMattersDivide"].divide([image], [None], [0.3])

    kept_loaded = select(nodes, "PatchMattersVLMLoader", tiny_models / "vlm-qwen2_5_vl", keep_loaded=True)
    nodes["PatchMattersLocalDescribe"].describe([image], patches, [kept_loaded], [1], [0.7], [0], [4], [""], [0])
    assert loading.cached_count("vlm") == 1

    released = select(nodes, "PatchMattersVLMLoader", tiny_models / "vlm-qwen2_5_vl", keep_loaded=False)
    nodes["PatchMattersLocalDescribe"].describe([image], patches, [released], [1], [0.7], [0], [4], [""], [0])
    assert loading.cached_count() == 0


@pytest.mark.slow
def test_caption_node_with_smollm2_gguf(nodes, tiny_models, photos, smollm2_gguf):
    vlm = select(nodes, "PatchMattersVLMLoader", tiny_models / "vlm-qwen2_5_vl")
    llm = select(nodes, "PatchMattersLLMLoader", smollm2_gguf, keep_loaded=True)
    image = image_tensor(photos[0], 64, 64)

    # One sample per patch leaves nothing to sort, so SmolLM2 writes only the merges.
    output = nodes["PatchMattersCaption"].caption(
        [image], [vlm], [1], [0], [16], [0], llm=[llm],
        global_caption=["A man rides a bicycle past a red car on a city street."],
    )
    (caption,), (trace,) = output["result"]

    assert caption.strip()
    assert json.loads(trace)["models"]["llm"]["source"].endswith(".gguf")
    assert loading.cached_count("vlm") == 0
    assert loading.cached_count("llm") == 1
