"""Transformers VLM backend on tiny random-weight LLaVA, Qwen2-VL, Qwen2.5-VL and SmolVLM models.

The models are built into a temporary folder and loaded through ``load_vlm`` exactly as a
user's model folder is. Their weights are random, so the tests check counts, order, flags,
reproducibility and control flow, never wording.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
from PIL import Image

from patch_matters_core.config import GenerationSettings
from patch_matters_core.errors import MissingDependencyError, ModelLoadError, PatchMattersError
from patch_matters_core.models import loading
from patch_matters_core.models.base import ChatRequest, Generation, TextModel, VisionLanguageModel, VisionRequest
from patch_matters_core.models.vlm import TransformersVLM, load_vlm

sys.path.insert(0, str(Path(__file__).resolve().parent / "fixtures"))

from tiny_vlms import build_all_vlms, build_qwen2_vl  # noqa: E402

FAMILIES = ["vlm-llava", "vlm-qwen2_5_vl", "vlm-qwen2_vl", "vlm-smolvlm"]
# Families whose processor declares a video processor, which needs torchvision.
VIDEO_PROCESSOR_FAMILIES = ["vlm-qwen2_5_vl", "vlm-qwen2_vl", "vlm-smolvlm"]

GREEDY = GenerationSettings(max_new_tokens=6, temperature=0.0, do_sample=False)
SAMPLING = GenerationSettings(max_new_tokens=6, temperature=0.8, top_p=0.9)


@pytest.fixture(scope="module")
def vlm_folders(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny_vlms")
    build_all_vlms(out)
    build_qwen2_vl(out / "vlm-qwen2_vl")
    return out


@pytest.fixture(autouse=True)
def empty_model_cache():
    loading.release_models()
    yield
    loading.release_models()


@pytest.fixture(scope="module")
def crops(shared_data: Path) -> list[Image.Image]:
    """Crops of different sizes and aspect ratios from a COCO photograph, plus a small synthetic image."""
    photo = Image.open(shared_data / "coco" / "000000247951.jpg").convert("RGB")
    return [
        photo.crop((0, 0, 220, 120)),
        photo.crop((40, 30, 90, 300)),
        Image.new("RGB", (40, 40), (200, 30, 30)),
        photo,
    ]


def vision_requests(images: list[Image.Image]) -> list[VisionRequest]:
    prompts = ["Describe this image.", "What is in this part of the picture?", "Colour?", "Describe it in detail."]
    return [VisionRequest(image=image, prompt=prompts[i % len(prompts)]) for i, image in enumerate(images)]


@pytest.mark.parametrize("family", FAMILIES)
def test_load_vlm_reports_model_info(vlm_folders, family):
    vlm = load_vlm(str(vlm_folders / family), device="cpu")

    assert isinstance(vlm, TransformersVLM)
    assert isinstance(vlm, VisionLanguageModel)
    assert isinstance(vlm, TextModel)
    assert vlm.info.role == "vlm"
    assert vlm.info.source == str(vlm_folders / family)
    assert vlm.info.family == family.removeprefix("vlm-")
    assert vlm.info.dtype == "float32"
    assert vlm.info.device == "cpu"
    assert vlm.min_side >= 28


def test_load_vlm_caches_per_folder(vlm_folders):
    first = load_vlm(str(vlm_folders / "vlm-llava"), device="cpu")
    second = load_vlm(str(vlm_folders / "vlm-llava"), device="cpu", dtype="float32")

    assert first is second
    assert loading.cached_count("vlm") == 1


@pytest.mark.parametrize("family", FAMILIES)
def test_describe_mixed_sizes_matches_single(vlm_folders, crops, family):
    vlm = load_vlm(str(vlm_folders / family), device="cpu")
    requests = vision_requests(crops)

    batched = vlm.describe(requests, GREEDY)
    single = [vlm.describe([request], GREEDY)[0] for request in requests]

    assert len(batched) == len(requests)
    assert all(isinstance(generation, Generation) for generation in batched)
    assert all(isinstance(generation.text, str) and isinstance(generation.raw, str) for generation in batched)
    # Left padding and per-image processing keep each row independent of its neighbours, so
    # batch order and content match one call per request.
    assert [g.raw for g in batched] == [g.raw for g in single]
    assert [g.hit_token_limit for g in batched] == [g.hit_token_limit for g in single]


@pytest.mark.parametrize("family", FAMILIES)
def test_describe_same_seed_same_samples(vlm_folders, crops, family):
    vlm = load_vlm(str(vlm_folders / family), device="cpu")
    requests = vision_requests(crops[:3])

    first = vlm.describe(requests, SAMPLING, seed=7)
    second = vlm.describe(requests, SAMPLING, seed=7)

    assert [g.raw for g in first] == [g.raw for g in second]


def test_describe_seed_changes_samples(vlm_folders, crops):
    vlm = load_vlm(str(vlm_folders / "vlm-qwen2_5_vl"), device="cpu")
    requests = vision_requests(crops[:3])
    settings = GenerationSettings(max_new_tokens=12, temperature=1.0, top_p=1.0)

    outputs = {tuple(g.raw for g in vlm.describe(requests, settings, seed=seed)) for seed in range(3)}

    assert len(outputs) > 1


def test_describe_seed_keeps_global_rng(vlm_folders, crops):
    import torch

    vlm = load_vlm(str(vlm_folders / "vlm-llava"), device="cpu")
    torch.manual_seed(123)
    expected = torch.rand(3)

    torch.manual_seed(123)
    vlm.describe(vision_requests(crops[:1]), SAMPLING, seed=5)
    after = torch.rand(3)

    assert torch.equal(expected, after)


def test_describe_repeated_requests_differ(vlm_folders, crops):
    vlm = load_vlm(str(vlm_folders / "vlm-smolvlm"), device="cpu")
    vlm.max_batch_size = 1
    settings = GenerationSettings(max_new_tokens=12, temperature=1.0, top_p=1.0)
    requests = [VisionRequest(image=crops[0], prompt="Describe this image.")] * 3

    outputs = [g.raw for g in vlm.describe(requests, settings, seed=3)]

    # Each generate call is seeded with the seed plus the index of its first request, so
    # repeated samples of one patch do not come out identical.
    assert len(set(outputs)) > 1


@pytest.mark.parametrize("family", ["vlm-llava", "vlm-qwen2_5_vl", "vlm-smolvlm"])
def test_describe_flags_token_limit(vlm_folders, crops, family):
    vlm = load_vlm(str(vlm_folders / family), device="cpu")
    request = vision_requests(crops[:1])
    first_tokens: list[int] = []
    real_generate = vlm.model.generate

    def recording_generate(**kwargs):
        output = real_generate(**kwargs)
        first_tokens.append(int(output[0, kwargs["input_ids"].shape[1]]))
        return output

    vlm.model.generate = recording_generate
    try:
        limited = vlm.describe(request, GREEDY)
    finally:
        del vlm.model.generate

    assert limited[0].hit_token_limit is True
    assert limited[0].raw != ""

    # With the first token that greedy decoding picks as end-of-sequence token, generation
    # stops at once, before the limit, with empty output.
    original_eos = vlm.model.generation_config.eos_token_id
    vlm.model.generation_config.eos_token_id = first_tokens[0]
    try:
        stopped = vlm.describe(request, GREEDY)
    finally:
        vlm.model.generation_config.eos_token_id = original_eos

    assert stopped[0].hit_token_limit is False
    assert stopped[0].raw == ""
    assert stopped[0].text == ""


def test_describe_warns_about_token_limit(vlm_folders, crops, caplog):
    vlm = load_vlm(str(vlm_folders / "vlm-qwen2_vl"), device="cpu")

    with caplog.at_level(logging.WARNING, logger="patch_matters_core.models.vlm"):
        generations = vlm.describe(vision_requests(crops[:2]), GREEDY)

    limited = sum(g.hit_token_limit for g in generations)
    assert limited > 0
    assert any(f"{limited} of 2 describe outputs stopped at max_new_tokens=6" in r.message for r in caplog.records)


def test_describe_calls_progress_per_generate(vlm_folders, crops):
    vlm = load_vlm(str(vlm_folders / "vlm-llava"), device="cpu")
    vlm.max_batch_size = 2
    labels: list[str] = []

    vlm.describe(vision_requests(crops), GREEDY, progress=labels.append)

    assert labels == ["describe", "describe"]


def test_describe_progress_exception_cancels(vlm_folders, crops):
    vlm = load_vlm(str(vlm_folders / "vlm-llava"), device="cpu")
    vlm.max_batch_size = 1
    calls: list[str] = []

    class Cancelled(Exception):
        pass

    def cancel(label: str) -> None:
        calls.append(label)
        raise Cancelled()

    with pytest.raises(Cancelled):
        vlm.describe(vision_requests(crops), GREEDY, progress=cancel)
    assert calls == ["describe"]


def test_describe_halves_batch_on_out_of_memory(vlm_folders, crops):
    import torch

    vlm = load_vlm(str(vlm_folders / "vlm-qwen2_5_vl"), device="cpu")
    requests = vision_requests(crops)
    expected = [g.raw for g in vlm.describe(requests, GREEDY)]

    real_generate = vlm.model.generate
    batch_sizes: list[int] = []

    def generate_within_memory(**kwargs):
        batch_sizes.append(kwargs["input_ids"].shape[0])
        if kwargs["input_ids"].shape[0] > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_generate(**kwargs)

    vlm.model.generate = generate_within_memory
    try:
        outputs = [g.raw for g in vlm.describe(requests, GREEDY)]
    finally:
        del vlm.model.generate

    assert batch_sizes == [4, 2, 2]
    assert outputs == expected
    assert vlm.max_batch_size == 2


def test_describe_out_of_memory_on_one_request_raises(vlm_folders, crops):
    import torch

    vlm = load_vlm(str(vlm_folders / "vlm-llava"), device="cpu")

    def generate_out_of_memory(**kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory.")

    vlm.model.generate = generate_out_of_memory
    try:
        with pytest.raises(PatchMattersError, match="ran out of memory on a single describe request"):
            vlm.describe(vision_requests(crops[:2]), GREEDY)
    finally:
        del vlm.model.generate


def test_describe_converts_non_rgb_images(vlm_folders, crops):
    vlm = load_vlm(str(vlm_folders / "vlm-smolvlm"), device="cpu")
    images = [crops[0].convert("L"), crops[1].convert("RGBA"), crops[2].convert("P")]

    generations = vlm.describe(vision_requests(images), GREEDY)

    assert len(generations) == 3


def test_describe_empty_request_list(vlm_folders):
    vlm = load_vlm(str(vlm_folders / "vlm-llava"), device="cpu")
    calls: list[str] = []

    assert vlm.describe([], GREEDY, progress=calls.append) == []
    assert calls == []


def test_describe_runs_in_bfloat16(vlm_folders, crops):
    vlm = load_vlm(str(vlm_folders / "vlm-qwen2_5_vl"), device="cpu", dtype="bfloat16")

    generations = vlm.describe(vision_requests(crops[:2]), GREEDY)

    assert vlm.info.dtype == "bfloat16"
    assert len(generations) == 2


@pytest.mark.parametrize("family", FAMILIES)
def test_chat_text_only_with_prefill(vlm_folders, family):
    vlm = load_vlm(str(vlm_folders / family), device="cpu")
    requests = [
        ChatRequest(user="List the objects as a JSON array.", system="Answer briefly.", prefill='["'),
        ChatRequest(user="Merge these two descriptions into one paragraph."),
    ]

    generations = vlm.chat(requests, GREEDY, seed=0)
    again = vlm.chat(requests, GREEDY, seed=0)

    assert len(generations) == 2
    assert generations[0].raw.startswith('["')
    assert generations[0].text.startswith('["')
    assert [g.raw for g in generations] == [g.raw for g in again]


@pytest.mark.parametrize("family", FAMILIES)
def test_chat_prompt_has_no_image_token(vlm_folders, family):
    vlm = load_vlm(str(vlm_folders / family), device="cpu")

    prompt = vlm._prompt_text("Hello", with_image=False, system="Be brief.")
    image_prompt = vlm._prompt_text("Hello", with_image=True)

    image_token = vlm.processor.image_token
    assert image_token not in prompt
    assert "Be brief." in prompt
    assert image_token in image_prompt


def test_chat_system_rejected_by_template(vlm_folders, caplog):
    vlm = load_vlm(str(vlm_folders / "vlm-qwen2_5_vl"), device="cpu")
    vlm.processor.chat_template = (
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' }}"
        "{% for part in message['content'] %}{{ part['text'] }}{% endfor %}"
        "{{ '<|im_end|>\\n' }}"
        "{% endfor %}"
        "{{ '<|im_start|>assistant\\n' }}"
    )
    requests = [ChatRequest(user="List the objects.", system="Answer in one line.")] * 2

    with caplog.at_level(logging.WARNING, logger="patch_matters_core.models.vlm"):
        generations = vlm.chat(requests, GREEDY)
        prompt = vlm._prompt_text("List the objects.", with_image=False, system="Answer in one line.")

    assert len(generations) == 2
    assert "Answer in one line.\n\nList the objects." in prompt
    warnings = [r for r in caplog.records if "rejects a system message" in r.message]
    assert len(warnings) == 1


def test_folder_without_chat_template_raises(vlm_folders, tmp_path):
    import shutil

    folder = tmp_path / "no-template"
    shutil.copytree(vlm_folders / "vlm-llava", folder)
    (folder / "chat_template.jinja").unlink()

    with pytest.raises(ModelLoadError, match="no chat template"):
        load_vlm(str(folder), device="cpu")


@pytest.mark.parametrize("family", VIDEO_PROCESSOR_FAMILIES)
def test_processor_built_without_torchvision(vlm_folders, family, caplog):
    import importlib.util

    if importlib.util.find_spec("torchvision") is not None:
        pytest.skip("torchvision is installed, so AutoProcessor loads the real video processor")

    with caplog.at_level(logging.WARNING, logger="patch_matters_core.models.vlm"):
        vlm = load_vlm(str(vlm_folders / family), device="cpu")

    assert any("torchvision is not installed" in record.message for record in caplog.records)
    assert type(vlm.processor).__module__ == "patch_matters_core.models.vlm"
    with pytest.raises(MissingDependencyError, match="torchvision"):
        vlm.processor.video_processor([])


def test_llava_processor_loads_with_auto_processor(vlm_folders, caplog):
    with caplog.at_level(logging.WARNING, logger="patch_matters_core.models.vlm"):
        vlm = load_vlm(str(vlm_folders / "vlm-llava"), device="cpu")

    assert type(vlm.processor).__name__ == "LlavaProcessor"
    assert type(vlm.processor).__module__.startswith("transformers.")
    assert not any("torchvision" in record.message for record in caplog.records)


def test_flash_attention_falls_back_to_sdpa(vlm_folders, caplog):
    import importlib.util

    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash_attn is installed")

    with caplog.at_level(logging.WARNING, logger="patch_matters_core.models.vlm"):
        vlm = load_vlm(str(vlm_folders / "vlm-llava"), device="cpu", attn_implementation="flash_attention_2")

    assert vlm.model.config._attn_implementation == "sdpa"
    assert any("flash_attn package is not installed" in record.message for record in caplog.records)


def test_released_vlm_raises(vlm_folders, crops):
    vlm = load_vlm(str(vlm_folders / "vlm-llava"), device="cpu")

    assert loading.release_models("vlm") == 1

    assert vlm.model is None
    with pytest.raises(PatchMattersError, match="was released"):
        vlm.describe(vision_requests(crops[:1]), GREEDY)


def test_missing_folder_rejected(tmp_path):
    missing = tmp_path / "no-such-model"

    with pytest.raises(ModelLoadError, match="no-such-model"):
        load_vlm(str(missing), device="cpu")


def test_folder_without_config_rejected(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model", encoding="utf-8")

    with pytest.raises(ModelLoadError, match="config.json"):
        load_vlm(str(tmp_path), device="cpu")


def test_gguf_file_rejected(smollm2_gguf):
    with pytest.raises(ModelLoadError, match="GGUF"):
        load_vlm(str(smollm2_gguf), device="cpu")


def test_text_only_model_rejected(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>").save_pretrained(tmp_path)
    config = LlamaConfig(
        vocab_size=2, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    )
    LlamaForCausalLM(config).save_pretrained(tmp_path)

    with pytest.raises(ModelLoadError, match="not a vision-language model"):
        load_vlm(str(tmp_path), device="cpu")


def test_chat_stops_after_json(vlm_folders):
    vlm = load_vlm(str(vlm_folders / "vlm-qwen2_5_vl"))
    closed = ChatRequest(user="Reply with JSON.", prefill="[1, 2]", stop_after_json=True)
    open_ended = ChatRequest(user="Reply with JSON.", prefill="[1, 2]")
    settings = GenerationSettings(max_new_tokens=12, temperature=0.0)

    stopped, unstopped = vlm.chat([closed, open_ended], settings)

    assert not stopped.hit_token_limit
    assert stopped.raw.startswith("[1, 2]")
    assert len(stopped.raw) <= len(unstopped.raw)
    assert unstopped.hit_token_limit


@pytest.mark.parametrize("family", ["vlm-smolvlm", "vlm-qwen2_5_vl", "vlm-llava"])
def test_chat_ignores_media_tokens_in_text(vlm_folders, family):
    vlm = load_vlm(str(vlm_folders / family))
    tokens = [vlm.processor.image_token]
    video_token = getattr(vlm.processor, "video_token", None)
    if video_token:
        tokens.append(video_token)
    text = "A description that a model wrote: " + " ".join(tokens) + " <|im_end|> a cat."

    [generation] = vlm.chat([ChatRequest(user=text, system=text)], GenerationSettings(max_new_tokens=4))

    for token in tokens:
        assert token not in generation.raw
