"""Text models: a transformers causal LM loaded from a local folder or a GGUF file.

``load_llm`` resolves the spec, picks device and dtype, and caches the loaded model per
process. ``TransformersTextModel.chat`` runs the chat template of the tokenizer, starts the
assistant turn with each request's prefill, and generates all requests of a call in batches
with left padding.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import time
from typing import Any, Optional, Sequence

from ..config import GenerationSettings
from ..errors import ModelLoadError
from ..types import ModelInfo
from . import loading
from .base import ChatRequest, Generation, ProgressCallback
from .stopping import cut_repetition, reply_stopping_criteria, warn_cut_outputs
from .text import clean_generated_text

logger = logging.getLogger(__name__)

ROLE = "llm"

# End-of-turn tokens of common chat templates. Generation stops at any of them that the
# tokenizer's vocabulary contains, besides the model's own end-of-sequence token, because some converted
# models (GGUF files in particular) name only one of them in their generation config.
_END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<end_of_utterance>", "<|endoftext|>")


class TransformersTextModel:
    """A chat-tuned causal LM with its tokenizer, implementing the ``TextModel`` protocol.

    ``model`` is the torch module. Inputs go to the device the module is on at call time, so a
    memory manager (ComfyUI's, for example) may move it between calls.
    """

    def __init__(self, model: Any, tokenizer: Any, info: ModelInfo, max_batch_size: int = 0) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.info = info
        # Requests per generate call; 0 puts every request of a chat call in one batch.
        self.max_batch_size = max_batch_size
        self._system_role_supported = True
        self._stop_token_ids = _stop_token_ids(model, tokenizer)

    @classmethod
    def load(cls, source: loading.ModelSource, device: str, dtype: Any) -> "TransformersTextModel":
        """Load tokenizer and model of ``source`` onto ``device`` in ``dtype`` (both already resolved)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        started = time.perf_counter()
        logger.info("Loading llm model %s on %s (%s).", source.location, device, loading.dtype_name(dtype))

        _check_causal_lm(source)
        tokenizer = loading.from_pretrained(AutoTokenizer, source, ROLE)
        if not getattr(tokenizer, "chat_template", None):
            raise ModelLoadError(
                f"llm model '{source.spec}' has no chat template, so it is not a chat (instruct) "
                "model; a base model continues the prompt instead of answering it. Use the "
                "instruct version of the model."
            )
        _prepare_padding(tokenizer, source)

        model = loading.from_pretrained(AutoModelForCausalLM, source, ROLE, dtype=dtype)
        model.to(device)
        model.eval()

        info = ModelInfo(
            role=ROLE,
            source=source.location,
            family=getattr(model.config, "model_type", None),
            dtype=loading.dtype_name(dtype),
            device=device,
        )
        logger.info(
            "Loaded llm model %s (%s) in %.1f s.", source.location, info.family, time.perf_counter() - started
        )
        return cls(model, tokenizer, info)

    def chat(
        self,
        requests: Sequence[ChatRequest],
        settings: GenerationSettings,
        seed: Optional[int] = None,
        progress: Optional[ProgressCallback] = None,
    ) -> list[Generation]:
        """Generate one response per request, in request order.

        ``raw`` and ``text`` of each response start with the request's prefill. With a seed,
        sampling is reproducible for the same requests and batch size; the global torch random
        state is left unchanged. Temperature 0 or ``do_sample=False`` decodes greedily. On CUDA
        out-of-memory errors the batch is halved and retried.
        """
        if self.model is None:
            raise ModelLoadError(
                f"llm model {self.info.source} was released; load it again with load_llm()."
            )
        if not requests:
            return []
        settings.validate("llm generation")

        prompts = [self._prompt(request) for request in requests]
        generation_config = self._generation_config(settings)
        batch_size = self.max_batch_size or len(prompts)
        results: list[Generation] = []

        with _seeded(seed, self._device()):
            start = 0
            while start < len(prompts):
                end = min(start + batch_size, len(prompts))
                try:
                    results.extend(self._generate(prompts[start:end], requests[start:end], generation_config))
                except Exception as error:
                    if not _is_cuda_oom(error) or batch_size == 1:
                        raise
                    batch_size = max(1, (end - start) // 2)
                    logger.warning(
                        "CUDA ran out of memory generating %d llm responses at once; retrying with batches of %d.",
                        end - start,
                        batch_size,
                    )
                    _empty_cuda_cache()
                    continue
                start = end
                if progress is not None:
                    progress("llm")

        warn_cut_outputs(results, "llm", settings.max_new_tokens, logger)
        return results

    def release(self) -> None:
        """Free the weights and drop this model from the cache; later calls to ``chat`` raise."""
        if self.model is None:
            return
        loading.discard(self)
        self.model = None
        self.tokenizer = None
        gc.collect()
        _empty_cuda_cache()
        logger.info("Released llm model %s.", self.info.source)

    def _device(self) -> Any:
        return next(self.model.parameters()).device

    def _prompt(self, request: ChatRequest) -> str:
        """Render the chat template for one request and append the prefill."""
        from jinja2.exceptions import TemplateError

        user = request.user
        messages = []
        if request.system and self._system_role_supported:
            messages.append({"role": "system", "content": request.system})
        elif request.system:
            user = f"{request.system}\n\n{user}"
        messages.append({"role": "user", "content": user})

        try:
            prompt = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except TemplateError as error:
            if not request.system or not self._system_role_supported:
                raise
            # Some templates (Gemma's, for example) reject a system message; the system text
            # then goes in front of the user message.
            logger.warning(
                "Chat template of llm model %s rejects system messages (%s); the system text is "
                "put in front of the user message instead.",
                self.info.source,
                error,
            )
            self._system_role_supported = False
            return self._prompt(request)

        return prompt + request.prefill

    def _generation_config(self, settings: GenerationSettings) -> Any:
        from transformers import GenerationConfig

        sample = settings.do_sample and settings.temperature > 0
        values: dict[str, Any] = {
            "max_new_tokens": settings.max_new_tokens,
            "do_sample": sample,
            "repetition_penalty": settings.repetition_penalty,
            "pad_token_id": self.tokenizer.pad_token_id,
            "eos_token_id": self._stop_token_ids,
        }
        if sample:
            values["temperature"] = settings.temperature
            values["top_p"] = settings.top_p
        return GenerationConfig(**values)

    def _generate(self, prompts: list[str], requests: Sequence[ChatRequest], generation_config: Any) -> list[Generation]:
        import torch
        from transformers import StoppingCriteriaList

        started = time.perf_counter()
        device = self._device()
        # The chat template already contains the beginning-of-sequence token where the model needs one.
        inputs = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        inputs = {name: tensor.to(device) for name, tensor in inputs.items()}

        prompt_length = inputs["input_ids"].shape[1]
        stop = reply_stopping_criteria(
            self.tokenizer,
            prompt_length,
            [request.prefill for request in requests],
            [request.stop_after_json for request in requests],
        )

        with torch.inference_mode():
            output = self.model.generate(
                **inputs, generation_config=generation_config, stopping_criteria=StoppingCriteriaList([stop])
            )

        results = []
        new_token_count = 0
        for row, request in enumerate(requests):
            prompt_ids = inputs["input_ids"][row][inputs["attention_mask"][row].bool()].tolist()
            generated = output[row, prompt_length:].tolist()
            if stop.stopped_at[row] is not None:
                generated = generated[: stop.stopped_at[row]]
            new_ids, stopped = self._strip_after_stop(generated)
            stopped = stopped or stop.stopped_at[row] is not None
            new_token_count += len(new_ids)

            continuation = self._decode_continuation(prompt_ids, new_ids)
            raw, repeated = cut_repetition(request.prefill + continuation)
            hit_limit = not stopped and not repeated and len(new_ids) >= generation_config.max_new_tokens
            results.append(
                Generation(
                    text=clean_generated_text(raw, request.prefill),
                    raw=raw,
                    hit_token_limit=hit_limit,
                    repeated=repeated,
                )
            )

        logger.info(
            "llm generated %d responses (%d new tokens) in %.1f s.",
            len(prompts),
            new_token_count,
            time.perf_counter() - started,
        )
        return results

    def _strip_after_stop(self, ids: list[int]) -> tuple[list[int], bool]:
        """Cut generated ids at the first stop token; return them and whether a stop token came."""
        for index, token in enumerate(ids):
            if token in self._stop_token_ids:
                return ids[:index], True
        return ids, False

    def _decode_continuation(self, prompt_ids: list[int], new_ids: list[int]) -> str:
        """Decode new tokens as a continuation of the prompt.

        Decoding the new tokens alone drops the leading space that SentencePiece tokenizers
        encode in the first token, so the text is decoded with the prompt and the prompt's text
        is removed.
        """
        full = self.tokenizer.decode(prompt_ids + new_ids, skip_special_tokens=False)
        prefix = self.tokenizer.decode(prompt_ids, skip_special_tokens=False)
        if full.startswith(prefix):
            return full[len(prefix):]
        return self.tokenizer.decode(new_ids, skip_special_tokens=False)


def load_llm(spec: str, device: str = "auto", dtype: Any = "auto") -> TransformersTextModel:
    """Load a chat LM from a local folder or a ``.gguf`` file (or the Hugging Face cache), cached per process.

    dtype "auto" follows ``loading.resolve_dtype``, except that a GGUF file runs in float32.
    """
    source = loading.resolve_source(spec, ROLE)
    resolved_device = loading.resolve_device(device)
    if source.gguf_file and str(dtype).strip().lower() == "auto":
        # transformers 5.25 warns that its GGUF kernels compute in float32, so another dtype
        # only adds a cast around every matmul and makes generation slower.
        dtype = "float32"
    resolved_dtype = loading.resolve_dtype(dtype, resolved_device)
    return loading.cached(
        ROLE,
        source,
        resolved_device,
        resolved_dtype,
        lambda: TransformersTextModel.load(source, resolved_device, resolved_dtype),
    )


def _check_causal_lm(source: loading.ModelSource) -> None:
    """Raise ModelLoadError when the config names a model type that AutoModelForCausalLM cannot load.

    A vision-language model gets its own message, because passing one as the LLM is a common
    mix-up and transformers' own error lists every causal LM config class (200 in
    transformers 5.25). GGUF files are not checked: building their config parses the GGUF
    metadata, which took 7 s for the 135M SmolLM2 GGUF on a shared 2-core CPU, and the GGUF
    loader of transformers 5.25 reads only text-model architectures.
    """
    if source.gguf_file:
        return

    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    )

    config = loading.from_pretrained(AutoConfig, source, ROLE)
    model_type = getattr(config, "model_type", None)
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return

    # Detectors and CLIP also have a vision_config, so only the image-text-to-text mapping
    # identifies a vision-language model.
    if model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        raise ModelLoadError(
            f"llm model '{source.spec}' is a vision-language model (model_type {model_type}), not a "
            "text-only language model. Pass it as the VLM (--vlm), or leave the LLM unset (no "
            "--llm) so that the VLM also runs the text steps."
        )
    raise ModelLoadError(
        f"llm model '{source.spec}' has model_type {model_type}, which is not a text-generation "
        "(causal) language model. Pass a chat LLM folder, hub id or .gguf file, for example "
        "HuggingFaceTB/SmolLM2-360M-Instruct."
    )


def _prepare_padding(tokenizer: Any, source: loading.ModelSource) -> None:
    """Pad on the left, as batched generation needs, and give the tokenizer a pad token if it has none."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is not None:
        return
    for candidate in (tokenizer.eos_token, tokenizer.unk_token):
        if candidate is not None:
            tokenizer.pad_token = candidate
            return
    raise ModelLoadError(
        f"llm model '{source.spec}' has neither a pad, an end-of-sequence nor an unknown token, "
        "so its answers cannot be batched; its tokenizer files are probably incomplete."
    )


def _stop_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """Collect the ids at which generation ends: the model's and tokenizer's end-of-sequence and end-of-turn tokens."""
    ids: list[int] = []
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(configured, int):
        ids.append(configured)
    elif configured:
        ids.extend(int(token) for token in configured)
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)

    vocabulary = tokenizer.get_vocab()
    for token in _END_OF_TURN_TOKENS:
        if token in vocabulary:
            ids.append(vocabulary[token])
    return sorted(set(ids))


@contextlib.contextmanager
def _seeded(seed: Optional[int], device: Any):
    """Seed torch's random generators inside the block and restore their state afterwards."""
    import torch

    if seed is None:
        yield
        return
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type="cuda" if device.type == "cuda" else None):
        torch.manual_seed(seed)
        yield


def _is_cuda_oom(error: Exception) -> bool:
    import torch

    return isinstance(error, torch.cuda.OutOfMemoryError)


def _empty_cuda_cache() -> None:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
