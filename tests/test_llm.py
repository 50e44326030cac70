"""The transformers text model: a tiny random-weight Llama for control flow, the real SmolLM2 GGUF for behaviour."""

from __future__ import annotations

import copy
import logging
import re
import sys
from pathlib import Path

import pytest
import torch

from patch_matters_core.config import GenerationSettings
from patch_matters_core.errors import MissingDependencyError, ModelLoadError
from patch_matters_core.models import loading
from patch_matters_core.models.base import ChatRequest, Generation, TextModel
from patch_matters_core.models.llm import TransformersTextModel, load_llm
from patch_matters_core.models.stopping import repetition_cut
from patch_matters_core.models.text import extract_json

CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
NO_SYSTEM_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    + CHATML_TEMPLATE
)
CORPUS = [
    "A dog runs on the beach near the water.",
    "Two cats sleep on a red sofa in the living room.",
    "A man holds an umbrella while walking in the rain.",
    "The image shows a kitchen with white cupboards and a table.",
] * 20


def build_tiny_llama(folder: Path, chat_template: str | None) -> Path:
    """Save a random-weight two-layer Llama with a byte-level BPE tokenizer trained here."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(CORPUS, trainer)

    # No pad token: loading must pick one for batched generation.
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", unk_token="<|endoftext|>")
    if chat_template is not None:
        fast.chat_template = chat_template
    fast.save_pretrained(folder)

    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        eos_token_id=fast.eos_token_id,
        bos_token_id=None,
        pad_token_id=None,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", autouse=True)
def empty_model_cache():
    """Start from an empty model cache: earlier test modules may have left models in it."""
    loading.release_models()
    yield


@pytest.fixture(scope="module")
def tiny_chat_folder(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-chat-llama"), CHATML_TEMPLATE)


@pytest.fixture
def tiny_llm(tiny_chat_folder: Path) -> TransformersTextModel:
    model = load_llm(str(tiny_chat_folder), device="cpu")
    yield model
    model.release()


REQUESTS = [
    ChatRequest(user="Describe the dog."),
    ChatRequest(user="Describe the two cats on the sofa in the living room, with every detail.", prefill="The cats"),
    ChatRequest(user="Kitchen?", system="You describe images.", prefill='["'),
]
GREEDY = GenerationSettings(max_new_tokens=6, temperature=0.0, do_sample=False)


def test_tiny_load_info(tiny_llm: TransformersTextModel, tiny_chat_folder: Path) -> None:
    assert isinstance(tiny_llm, TextModel)
    assert tiny_llm.info.role == "llm"
    assert tiny_llm.info.family == "llama"
    assert tiny_llm.info.dtype == "float32"
    assert tiny_llm.info.device == "cpu"
    assert tiny_llm.info.source == str(tiny_chat_folder.resolve())
    assert isinstance(tiny_llm.model, torch.nn.Module)


def test_tiny_padding_prepared(tiny_llm: TransformersTextModel) -> None:
    assert tiny_llm.tokenizer.padding_side == "left"
    assert tiny_llm.tokenizer.pad_token == "<|im_end|>"


def test_tiny_load_cached(tiny_llm: TransformersTextModel, tiny_chat_folder: Path) -> None:
    other_dtype = load_llm(str(tiny_chat_folder), device="cpu", dtype="bfloat16")

    assert load_llm(str(tiny_chat_folder), device="cpu") is tiny_llm
    assert other_dtype is not tiny_llm
    assert other_dtype.info.dtype == "bfloat16"
    other_dtype.release()


def test_no_chat_template_rejected(tmp_path: Path) -> None:
    folder = build_tiny_llama(tmp_path / "base-llama", chat_template=None)

    with pytest.raises(ModelLoadError) as raised:
        load_llm(str(folder), device="cpu")

    assert "no chat template" in str(raised.value)
    assert "instruct" in str(raised.value)
    assert loading.cached_count("llm") == 0


def test_tiny_batch_matches_single(tiny_llm: TransformersTextModel) -> None:
    batched = tiny_llm.chat(REQUESTS, GREEDY)
    single = [tiny_llm.chat([request], GREEDY)[0] for request in REQUESTS]

    assert [g.raw for g in batched] == [g.raw for g in single]
    for generation, request in zip(batched, REQUESTS):
        assert isinstance(generation, Generation)
        assert generation.raw.startswith(request.prefill)


def test_tiny_batches_and_progress(tiny_llm: TransformersTextModel) -> None:
    labels = []
    whole = tiny_llm.chat(REQUESTS, GREEDY, progress=labels.append)
    assert labels == ["llm"]

    limited = TransformersTextModel(tiny_llm.model, tiny_llm.tokenizer, tiny_llm.info, max_batch_size=2)
    labels.clear()
    split = limited.chat(REQUESTS, GREEDY, progress=labels.append)

    assert labels == ["llm", "llm"]
    assert [g.raw for g in split] == [g.raw for g in whole]


def test_tiny_seed_reproducible(tiny_llm: TransformersTextModel) -> None:
    sampling = GenerationSettings(max_new_tokens=8, temperature=1.0, top_p=1.0)
    state_before = torch.get_rng_state()

    first = tiny_llm.chat(REQUESTS, sampling, seed=123)
    second = tiny_llm.chat(REQUESTS, sampling, seed=123)

    assert [g.raw for g in first] == [g.raw for g in second]
    assert torch.equal(torch.get_rng_state(), state_before)


def test_tiny_token_limit_flag(tiny_llm: TransformersTextModel, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="patch_matters_core.models.llm"):
        outputs = tiny_llm.chat(REQUESTS, GenerationSettings(max_new_tokens=2, temperature=0.0))

    limited = [g.hit_token_limit for g in outputs]
    assert all(limited)
    assert f"{len(outputs)} of {len(outputs)} llm outputs stopped at max_new_tokens=2" in caplog.text


def test_tiny_empty_requests(tiny_llm: TransformersTextModel) -> None:
    assert tiny_llm.chat([], GREEDY) == []


def test_tiny_system_role_rejected(tiny_llm: TransformersTextModel, caplog) -> None:
    tokenizer = copy.deepcopy(tiny_llm.tokenizer)
    tokenizer.chat_template = NO_SYSTEM_TEMPLATE
    model = TransformersTextModel(tiny_llm.model, tokenizer, tiny_llm.info)
    request = ChatRequest(user="Describe the dog.", system="You describe images.")

    with caplog.at_level(logging.WARNING, logger="patch_matters_core.models.llm"):
        prompt = model._prompt(request)

    assert "rejects system messages" in caplog.text
    assert "<|im_start|>system" not in prompt
    assert "You describe images.\n\nDescribe the dog." in prompt


def test_tiny_release(tiny_chat_folder: Path) -> None:
    model = load_llm(str(tiny_chat_folder), device="cpu")

    assert loading.release_models("llm") == 1
    assert model.model is None
    with pytest.raises(ModelLoadError, match="was released"):
        model.chat(REQUESTS, GREEDY)

    reloaded = load_llm(str(tiny_chat_folder), device="cpu")
    assert reloaded is not model
    reloaded.release()
    assert loading.cached_count("llm") == 0


def test_gguf_without_gguf_package(smollm2_gguf: Path, monkeypatch) -> None:
    # A None entry in sys.modules makes the import system report the package as missing.
    monkeypatch.setitem(sys.modules, "gguf", None)

    source = loading.resolve_source(str(smollm2_gguf), "llm")

    # TransformersTextModel.load bypasses the cache, which may already contain this model.
    with pytest.raises(MissingDependencyError, match="pip install gguf"):
        TransformersTextModel.load(source, "cpu", torch.float32)


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf: Path) -> TransformersTextModel:
    model = load_llm(str(smollm2_gguf), device="cpu")
    yield model
    model.release()


SMOLLM2_REQUESTS = [
    ChatRequest(user="Say hello.", prefill="Hello"),
    ChatRequest(user="List two colors as a JSON array of strings.", prefill='["'),
    ChatRequest(user="What animal barks? Answer in one word.", system="You answer briefly."),
]
SMOLLM2_GREEDY = GenerationSettings(max_new_tokens=12, temperature=0.0)


@pytest.fixture(scope="module")
def smollm2_greedy(smollm2: TransformersTextModel) -> tuple[list[Generation], list[str]]:
    labels: list[str] = []
    return smollm2.chat(SMOLLM2_REQUESTS, SMOLLM2_GREEDY, progress=labels.append), labels


@pytest.mark.slow
def test_smollm2_gguf_info(smollm2: TransformersTextModel, smollm2_gguf: Path) -> None:
    assert smollm2.info.family == "llama"
    assert smollm2.info.dtype == "float32"
    assert smollm2.info.source == str(smollm2_gguf.resolve())


@pytest.mark.slow
def test_smollm2_batch_prefill(smollm2_greedy) -> None:
    outputs, labels = smollm2_greedy

    assert len(outputs) == len(SMOLLM2_REQUESTS)
    assert labels == ["llm"]
    for output, request in zip(outputs, SMOLLM2_REQUESTS):
        assert output.raw.startswith(request.prefill)
        assert output.text.startswith(request.prefill)
        assert output.text.strip()
        assert "<|im_end|>" not in output.text
    # Short questions answered greedily end before 12 tokens for at least one request.
    assert not all(output.hit_token_limit for output in outputs)


@pytest.mark.slow
def test_smollm2_json_prefill_parses(smollm2_greedy) -> None:
    outputs, _ = smollm2_greedy
    parsed = extract_json(outputs[1].text)

    assert isinstance(parsed, list)
    assert parsed
    assert all(isinstance(item, str) for item in parsed)


@pytest.mark.slow
def test_smollm2_order_kept(smollm2: TransformersTextModel, smollm2_greedy) -> None:
    outputs, _ = smollm2_greedy

    reversed_outputs = smollm2.chat(SMOLLM2_REQUESTS[::-1], SMOLLM2_GREEDY)

    assert [g.raw for g in reversed_outputs[::-1]] == [g.raw for g in outputs]


@pytest.mark.slow
def test_smollm2_seed_reproducible(smollm2: TransformersTextModel) -> None:
    sampling = GenerationSettings(max_new_tokens=6, temperature=0.9)

    first = smollm2.chat(SMOLLM2_REQUESTS[:2], sampling, seed=5)
    second = smollm2.chat(SMOLLM2_REQUESTS[:2], sampling, seed=5)

    assert [g.raw for g in first] == [g.raw for g in second]


@pytest.mark.slow
def test_smollm2_token_limit(smollm2: TransformersTextModel, caplog) -> None:
    request = ChatRequest(user="Write a long story about a dragon.", prefill="Once upon a time")

    with caplog.at_level(logging.WARNING, logger="patch_matters_core.models.llm"):
        (output,) = smollm2.chat([request], GenerationSettings(max_new_tokens=2, temperature=0.0))

    assert output.hit_token_limit
    assert output.raw.startswith("Once upon a time")
    assert "1 of 1 llm outputs stopped at max_new_tokens=2" in caplog.text


def test_tiny_loop_stopped_and_cut(tiny_llm: TransformersTextModel, caplog) -> None:
    # Greedy decoding without a repetition penalty sends this random model into loops.
    settings = GenerationSettings(max_new_tokens=150, temperature=0.0, do_sample=False, repetition_penalty=1.0)
    requests = [ChatRequest(user="Describe the dog."), ChatRequest(user="Kitchen?", prefill='["')]

    with caplog.at_level(logging.INFO, logger="patch_matters_core.models.llm"):
        outputs = tiny_llm.chat(requests, settings)

    assert all(output.repeated and not output.hit_token_limit for output in outputs)
    assert all(repetition_cut(output.raw) is None for output in outputs)
    assert outputs[1].raw.startswith('["')
    assert "2 of 2 llm outputs kept repeating one passage" in caplog.text
    generated = re.search(r"llm generated 2 responses \((\d+) new tokens\)", caplog.text)
    assert generated and int(generated.group(1)) < 2 * settings.max_new_tokens


def test_tiny_stops_after_json(tiny_llm: TransformersTextModel) -> None:
    closed = ChatRequest(user="Reply with JSON.", prefill='{"done": true}', stop_after_json=True)
    open_ended = ChatRequest(user="Reply with JSON.", prefill='{"done": true}')
    settings = GenerationSettings(max_new_tokens=12, temperature=0.0)

    stopped, unstopped = tiny_llm.chat([closed, open_ended], settings)

    assert not stopped.hit_token_limit
    assert stopped.raw.startswith('{"done": true}')
    assert len(stopped.raw) < len(unstopped.raw)
    assert unstopped.hit_token_limit


@pytest.mark.parametrize(
    "folder_name, model_type",
    [("vlm-qwen2_5_vl", "qwen2_5_vl"), ("vlm-smolvlm", "smolvlm"), ("vlm-llava", "llava")],
)
def test_vlm_folder_rejected_briefly(tiny_models: Path, folder_name: str, model_type: str) -> None:
    cached_before = loading.cached_count("llm")
    with pytest.raises(ModelLoadError) as raised:
        load_llm(str(tiny_models / folder_name), device="cpu")

    message = str(raised.value)
    assert "vision-language model" in message
    assert f"model_type {model_type}" in message
    assert "--vlm" in message
    assert "leave the LLM unset" in message
    assert "Model type should be one of" not in message
    assert len(message) < 400
    assert loading.cached_count("llm") == cached_before


def test_detector_folder_rejected_as_not_causal(tiny_models: Path) -> None:
    cached_before = loading.cached_count("llm")
    with pytest.raises(ModelLoadError) as raised:
        load_llm(str(tiny_models / "det-owlv2"), device="cpu")

    message = str(raised.value)
    assert "model_type owlv2" in message
    assert "not a text-generation (causal) language model" in message
    assert loading.cached_count("llm") == cached_before
