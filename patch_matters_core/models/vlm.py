"""Chat VLMs that transformers loads with ``AutoProcessor`` and ``AutoModelForImageTextToText``.

``TransformersVLM`` describes images (``describe``) and, because a chat VLM is also a text
model, generates replies to text-only chats (``chat``), so one model in memory serves both
roles. Families differ only in small steps (how images are passed to the processor, the
smallest image side), which ``VLMFamily`` subclasses override. Tests run tiny LLaVA, Qwen2-VL,
Qwen2.5-VL and SmolVLM models. Other chat VLMs with a chat template run with the generic steps.

Processors that declare a video processor (Qwen2-VL, Qwen2.5-VL, Qwen3-VL and SmolVLM in
transformers 5.25) fail in ``AutoProcessor`` when torchvision is missing, because the video
processors need it. ``load_processor`` then builds the same processor class with a video
processor that rejects video, which is enough for images.

torch and transformers are imported inside the functions that need them.
"""

from __future__ import annotations

import importlib.util
import logging
import time
from typing import Any, Optional, Sequence

from ..config import GenerationSettings
from ..errors import MissingDependencyError, ModelLoadError, PatchMattersError
from ..types import ModelInfo
from . import loading
from .base import ChatRequest, Generation, ProgressCallback, VisionRequest
from .stopping import cut_repetition, reply_stopping_criteria, warn_cut_outputs
from .text import clean_generated_text

logger = logging.getLogger(__name__)

ROLE = "vlm"


class VLMFamily:
    """Steps of a chat VLM that a model family may change. The defaults suit LLaVA and Qwen-VL."""

    name = "generic"
    # Shortest image side sent to the processor. Qwen-VL processors resize to multiples of 28 px,
    # and CLIP and SigLIP processors resize any size.
    min_side = 28

    def user_content(self, prompt: str, with_image: bool) -> list[dict[str, Any]]:
        """Return the content parts of one user turn, with the image before the text."""
        parts: list[dict[str, Any]] = [{"type": "image"}] if with_image else []
        parts.append({"type": "text", "text": prompt})
        return parts

    def images_argument(self, images: list[Any]) -> list[Any]:
        """Return the ``images`` argument of the processor for one image per prompt."""
        return list(images)


class NestedImagesFamily(VLMFamily):
    """Idefics3 and SmolVLM processors take one list of images per prompt."""

    def images_argument(self, images: list[Any]) -> list[Any]:
        return [[image] for image in images]


class LlavaFamily(VLMFamily):
    name = "llava"


class QwenVLFamily(VLMFamily):
    name = "qwen_vl"


class SmolVLMFamily(NestedImagesFamily):
    name = "smolvlm"


# Model type (config.json "model_type") to family. Other model types use VLMFamily.
FAMILIES: dict[str, type[VLMFamily]] = {
    "llava": LlavaFamily,
    "llava_next": LlavaFamily,
    "llava_onevision": LlavaFamily,
    "qwen2_vl": QwenVLFamily,
    "qwen2_5_vl": QwenVLFamily,
    "qwen3_vl": QwenVLFamily,
    "idefics3": NestedImagesFamily,
    "smolvlm": SmolVLMFamily,
}


def family_for(model_type: str) -> VLMFamily:
    """Return the family steps for a config ``model_type``, or the generic steps for other types."""
    return FAMILIES.get(model_type, VLMFamily)()


class TransformersVLM:
    """A transformers chat VLM that implements both ``VisionLanguageModel`` and ``TextModel``.

    ``model`` is the torch module and ``processor`` its processor. Inputs go to the device the
    model is on at call time, because a memory manager (ComfyUI's) may move the module.
    ``max_batch_size`` caps the requests per ``generate`` call (0 means no cap); after a CUDA
    out-of-memory error the cap is halved and kept for later calls.
    """

    def __init__(
        self,
        model: Any,
        processor: Any,
        *,
        family: VLMFamily,
        source: str,
        model_type: str,
        max_batch_size: int = 0,
    ) -> None:
        self.model = model
        self.processor = processor
        self.family = family
        self.model_type = model_type
        self.min_side = family.min_side
        self.max_batch_size = max_batch_size
        self.info = ModelInfo(
            role=ROLE,
            source=source,
            family=model_type,
            dtype=loading.dtype_name(model.dtype),
            device=str(_model_device(model)),
        )
        self._system_role_supported = True
        self._special_token_texts: Optional[list[str]] = None

    # Public protocol methods.

    def describe(
        self,
        requests: Sequence[VisionRequest],
        settings: GenerationSettings,
        seed: Optional[int] = None,
        progress: Optional[ProgressCallback] = None,
    ) -> list[Generation]:
        """Generate one response per image request, in request order, in as few calls as memory allows."""
        prompts = [self._prompt_text(request.prompt, with_image=True) for request in requests]
        images = [_rgb(request.image) for request in requests]
        return self._run(prompts, images, [""] * len(requests), settings, seed, progress, label="describe")

    def chat(
        self,
        requests: Sequence[ChatRequest],
        settings: GenerationSettings,
        seed: Optional[int] = None,
        progress: Optional[ProgressCallback] = None,
    ) -> list[Generation]:
        """Generate one text-only response per request, starting each response with the request's ``prefill``."""
        prompts = [
            self._prompt_text(request.user, with_image=False, system=request.system) + request.prefill
            for request in requests
        ]
        prefills = [request.prefill for request in requests]
        json_rows = [request.stop_after_json for request in requests]
        return self._run(prompts, None, prefills, settings, seed, progress, label="chat", json_rows=json_rows)

    def release(self) -> None:
        """Drop the model and processor so that their memory can be freed. Later calls raise PatchMattersError."""
        self.model = None
        self.processor = None

    # Prompt building.

    def _prompt_text(self, prompt: str, *, with_image: bool, system: Optional[str] = None) -> str:
        """Render one conversation with the chat template, ending with the assistant's turn."""
        from jinja2 import TemplateError

        self._check_loaded()
        prompt = self._strip_special_tokens(prompt)
        system = self._strip_special_tokens(system) if system else system
        user = {"role": "user", "content": self.family.user_content(prompt, with_image)}
        if system and self._system_role_supported:
            messages = [{"role": "system", "content": [{"type": "text", "text": system}]}, user]
            try:
                return self._apply_template(messages)
            except TemplateError as error:
                # Templates reject a system turn with raise_exception(), which raises TemplateError.
                self._system_role_supported = False
                logger.warning(
                    "The chat template of VLM %s rejects a system message (%s). The system text is put "
                    "in front of the user message instead.",
                    self.info.source,
                    error,
                )
        if system:
            user = {"role": "user", "content": self.family.user_content(f"{system}\n\n{prompt}", with_image)}
        return self._apply_template([user])

    def _strip_special_tokens(self, text: str) -> str:
        """Remove special and media token strings (``<image>``, ``<video>``, ``<|im_end|>``...) from text.

        Prompts carry model-written descriptions; a media token in them would make the processor
        expect an image or video that is not there, and a control token would end the turn early.
        """
        if self._special_token_texts is None:
            tokenizer = getattr(self.processor, "tokenizer", self.processor)
            texts = {token for token in getattr(tokenizer, "all_special_tokens", []) if isinstance(token, str)}
            for attribute in ("image_token", "video_token", "boi_token", "eoi_token", "fake_image_token", "global_image_token"):
                value = getattr(self.processor, attribute, None)
                if isinstance(value, str):
                    texts.add(value)
            self._special_token_texts = sorted((text for text in texts if text.strip()), key=len, reverse=True)
        for token in self._special_token_texts:
            text = text.replace(token, " ")
        return text

    def _apply_template(self, messages: list[dict[str, Any]]) -> str:
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    # Generation.

    def _run(
        self,
        prompts: list[str],
        images: Optional[list[Any]],
        prefills: list[str],
        settings: GenerationSettings,
        seed: Optional[int],
        progress: Optional[ProgressCallback],
        *,
        label: str,
        json_rows: Optional[list[bool]] = None,
    ) -> list[Generation]:
        """Generate for all prompts in batches, halving the batch after a CUDA out-of-memory error.

        NOTE: the out-of-memory retry and the seeding of CUDA generators have run on the CPU only,
        with a simulated out-of-memory error, not on a GPU.
        """
        self._check_loaded()
        if not prompts:
            return []

        results: list[Optional[Generation]] = [None] * len(prompts)
        batch_size = len(prompts) if self.max_batch_size <= 0 else min(self.max_batch_size, len(prompts))
        start = 0
        started = time.perf_counter()
        while start < len(prompts):
            end = min(start + batch_size, len(prompts))
            try:
                batch = self._generate_batch(
                    prompts[start:end],
                    images[start:end] if images is not None else None,
                    prefills[start:end],
                    settings,
                    None if seed is None else seed + start,
                    json_rows[start:end] if json_rows is not None else None,
                )
            except Exception as error:
                if not _is_out_of_memory(error):
                    raise
                _free_cuda_cache()
                if batch_size == 1:
                    raise PatchMattersError(
                        f"VLM '{self.info.source}' ran out of memory on a single {label} request. Lower "
                        "describe.max_pixels or max_new_tokens, use dtype bfloat16 or float16, or a smaller model."
                    ) from error
                batch_size = max(1, batch_size // 2)
                self.max_batch_size = batch_size
                logger.warning(
                    "VLM ran out of memory on a batch of %d %s requests. Retrying with batches of %d.",
                    end - start,
                    label,
                    batch_size,
                )
                continue

            results[start:end] = batch
            start = end
            if progress is not None:
                progress(label)

        done = [result for result in results if result is not None]
        warn_cut_outputs(done, label, settings.max_new_tokens, logger)
        logger.info("VLM %s: %d requests done in %.1f s.", label, len(results), time.perf_counter() - started)
        return done

    def _generate_batch(
        self,
        prompts: list[str],
        images: Optional[list[Any]],
        prefills: list[str],
        settings: GenerationSettings,
        seed: Optional[int],
        json_rows: Optional[list[bool]] = None,
    ) -> list[Generation]:
        import torch
        from transformers import StoppingCriteriaList

        device = _model_device(self.model)
        self.info.device = str(device)
        processor_kwargs: dict[str, Any] = {"text": prompts, "return_tensors": "pt", "padding": True}
        if images is not None:
            processor_kwargs["images"] = self.family.images_argument(images)
        inputs = self.processor(**processor_kwargs)
        inputs = inputs.to(device)
        inputs = _cast_floating(inputs, self.model.dtype)

        generation_config = self._generation_config(settings)
        prompt_length = inputs["input_ids"].shape[1]
        tokenizer = getattr(self.processor, "tokenizer", self.processor)
        stop = reply_stopping_criteria(tokenizer, prompt_length, prefills, json_rows or [False] * len(prompts))

        started = time.perf_counter()
        with torch.inference_mode(), _seeded(seed, device):
            output = self.model.generate(
                **inputs, generation_config=generation_config, stopping_criteria=StoppingCriteriaList([stop])
            )
        seconds = time.perf_counter() - started

        new_tokens = output[:, prompt_length:].tolist()
        eos_ids = _token_ids(generation_config.eos_token_id)
        generations = []
        for row, (tokens, prefill) in enumerate(zip(new_tokens, prefills)):
            stopped_at = stop.stopped_at[row]
            if stopped_at is not None:
                generations.append(self._decode(tokens[:stopped_at], eos_ids, prefill, closed=True))
            else:
                generations.append(self._decode(tokens, eos_ids, prefill))
        logger.info(
            "VLM generate: batch of %d, %d prompt tokens, %d new tokens, %.1f s.",
            len(prompts),
            prompt_length,
            len(new_tokens[0]) if new_tokens else 0,
            seconds,
        )
        return generations

    def _generation_config(self, settings: GenerationSettings) -> Any:
        """Build the GenerationConfig of one call from the model's own and the settings."""
        import copy

        config = copy.deepcopy(self.model.generation_config)
        tokenizer = getattr(self.processor, "tokenizer", self.processor)
        if config.eos_token_id is None and tokenizer.eos_token_id is not None:
            config.eos_token_id = tokenizer.eos_token_id
        if config.pad_token_id is None:
            # Left padding needs a pad token. Without one, padding with end-of-sequence is the usual choice.
            eos_ids = _token_ids(config.eos_token_id)
            config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(eos_ids), None)

        config.max_new_tokens = settings.max_new_tokens
        config.max_length = None
        config.repetition_penalty = settings.repetition_penalty
        sample = settings.do_sample and settings.temperature > 0
        config.do_sample = sample
        if sample:
            config.temperature = settings.temperature
            config.top_p = settings.top_p
        else:
            # Greedy decoding ignores these; leaving checkpoint values set makes transformers warn.
            config.temperature = None
            config.top_p = None
            config.top_k = None
        return config

    def _decode(self, tokens: list[int], eos_ids: list[int], prefill: str, closed: bool = False) -> Generation:
        """Decode the new tokens of one row up to its end-of-sequence token.

        ``closed`` marks a row that a stopping criterion ended, so it did not hit the token limit.
        A reply that ends by repeating one passage is cut after the passage's first copy.
        """
        end = next((index for index, token in enumerate(tokens) if token in eos_ids), None)
        content_tokens = tokens if end is None else tokens[:end]
        decoded = self._strip_special_tokens(self.processor.decode(content_tokens, skip_special_tokens=False))
        raw, repeated = cut_repetition(prefill + decoded)
        hit_limit = end is None and not closed and not repeated
        return Generation(
            text=clean_generated_text(raw, prefill=prefill), raw=raw, hit_token_limit=hit_limit, repeated=repeated
        )

    def _check_loaded(self) -> None:
        if self.model is None or self.processor is None:
            raise PatchMattersError(
                f"VLM '{self.info.source}' was released. Load it again with load_vlm()."
            )


def load_vlm(
    spec: str,
    device: str = "auto",
    dtype: Any = "auto",
    attn_implementation: Optional[str] = None,
) -> TransformersVLM:
    """Load a chat VLM from a folder or hub id, once per process for each (spec, device, dtype).

    ``attn_implementation`` is passed to transformers ("sdpa", "eager", "flash_attention_2");
    "flash_attention_2" falls back to "sdpa" when the flash_attn package is missing.
    NOTE: the cache key leaves out ``attn_implementation``, so a second load of the same model
    with another attention implementation returns the first one.
    """
    source = loading.resolve_source(spec, ROLE)
    if source.gguf_file:
        raise ModelLoadError(
            f"vlm model '{spec}' is a GGUF file, but a VLM needs a transformers model folder with "
            "config.json and a processor, or a hub id."
        )
    resolved_device = loading.resolve_device(device)
    resolved_dtype = loading.resolve_dtype(dtype, resolved_device)
    return loading.cached(
        ROLE,
        source,
        resolved_device,
        resolved_dtype,
        lambda: _load(source, resolved_device, resolved_dtype, attn_implementation),
    )


def _load(source: loading.ModelSource, device: str, dtype: Any, attn_implementation: Optional[str]) -> TransformersVLM:
    from transformers import AutoConfig, AutoModelForImageTextToText

    started = time.perf_counter()
    logger.info("Loading VLM %s on %s (%s).", source.location, device, loading.dtype_name(dtype))

    config = loading.from_pretrained(AutoConfig, source, ROLE)
    model_type = getattr(config, "model_type", "") or ""
    family = family_for(model_type)

    processor = load_processor(source)
    if getattr(processor, "tokenizer", None) is None or getattr(processor, "image_processor", None) is None:
        raise ModelLoadError(
            f"vlm model '{source.spec}' ({model_type or 'unknown type'}) has no processor with both a "
            f"tokenizer and an image processor (loaded {type(processor).__name__}), so it is not a "
            "vision-language model. Pass a chat VLM such as a LLaVA, Qwen2-VL or SmolVLM folder."
        )
    if not getattr(processor, "chat_template", None):
        raise ModelLoadError(
            f"vlm model '{source.spec}' has no chat template (no chat_template.jinja or chat_template.json "
            "in its folder). Use the chat (instruction-tuned) version of the model."
        )
    # Generation appends to the end of each row, so shorter prompts are padded on the left.
    processor.tokenizer.padding_side = "left"

    kwargs: dict[str, Any] = {"dtype": dtype}
    attention = _attention_implementation(attn_implementation)
    if attention:
        kwargs["attn_implementation"] = attention
    model = loading.from_pretrained(AutoModelForImageTextToText, source, ROLE, config=config, **kwargs)
    model.to(device)
    model.eval()

    vlm = TransformersVLM(model, processor, family=family, source=source.location, model_type=model_type)
    logger.info(
        "Loaded VLM %s (%s) on %s (%s) in %.1f s.",
        source.location,
        model_type,
        vlm.info.device,
        vlm.info.dtype,
        time.perf_counter() - started,
    )
    return vlm


def load_processor(source: loading.ModelSource) -> Any:
    """Load the model's processor with AutoProcessor, or without its video processor when torchvision is missing."""
    from transformers import AutoProcessor

    try:
        return loading.from_pretrained(AutoProcessor, source, ROLE)
    except ImportError as error:
        if "torchvision" not in str(error).lower():
            raise MissingDependencyError(
                f"vlm model '{source.spec}' needs a package that is not installed: {error}"
            ) from error
        logger.warning(
            "torchvision is not installed, so the video processor of VLM %s cannot load. Building its "
            "processor with a video processor that rejects video, and images work as usual.",
            source.location,
        )
        return _processor_without_video(source)


def _processor_without_video(source: loading.ModelSource) -> Any:
    """Load the processor class of the model type with a stand-in video processor."""
    from transformers import AutoConfig
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING

    config = loading.from_pretrained(AutoConfig, source, ROLE)
    try:
        processor_class = PROCESSOR_MAPPING[type(config)]
    except KeyError as error:
        raise MissingDependencyError(
            f"vlm model '{source.spec}' ({config.model_type}) needs torchvision for its processor: "
            "pip install torchvision (matching your torch version)."
        ) from error

    tolerant_class = _accepting_any_video_processor(processor_class)
    return loading.from_pretrained(tolerant_class, source, ROLE, video_processor=_video_rejecting_processor())


def _accepting_any_video_processor(processor_class: type) -> type:
    """Subclass ``processor_class`` under the same name so that it accepts a video processor of any class.

    Without torchvision, transformers does not export ``VideoProcessorMixin`` at the top level,
    and the processor's argument type check fails on any video processor.
    """

    def check_argument_for_proper_class(self: Any, argument_name: str, argument: Any) -> Any:
        if argument_name == "video_processor":
            return type(argument)
        return processor_class.check_argument_for_proper_class(self, argument_name, argument)

    return type(
        processor_class.__name__,
        (processor_class,),
        {"check_argument_for_proper_class": check_argument_for_proper_class, "__module__": __name__},
    )


def _video_rejecting_processor() -> Any:
    """Return a video processor that raises MissingDependencyError when given a video."""
    from transformers.video_processing_utils import VideoProcessorMixin

    class VideoNeedsTorchvision(VideoProcessorMixin):
        # Attributes that processors read when they count video tokens.
        merge_size = 2
        temporal_patch_size = 2
        num_frames = 1
        fps = 1.0

        def __call__(self, videos: Any, **kwargs: Any) -> Any:
            raise MissingDependencyError("Video input needs torchvision: pip install torchvision.")

        preprocess = __call__

    return VideoNeedsTorchvision()


def _attention_implementation(requested: Optional[str]) -> Optional[str]:
    if requested == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        logger.warning("flash_attention_2 was requested but the flash_attn package is not installed, so sdpa is used.")
        return "sdpa"
    return requested


def _rgb(image: Any) -> Any:
    return image if image.mode == "RGB" else image.convert("RGB")


def _model_device(model: Any) -> Any:
    return next(model.parameters()).device


def _cast_floating(inputs: Any, dtype: Any) -> Any:
    """Cast the floating point inputs (pixel values) to the model's dtype, leaving token ids as integers."""
    import torch

    for key, value in list(inputs.items()):
        if isinstance(value, torch.Tensor) and torch.is_floating_point(value) and value.dtype != dtype:
            inputs[key] = value.to(dtype)
    return inputs


def _token_ids(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(token) for token in value]


class _seeded:
    """Seed torch's generators for one generate call and restore their previous state afterwards."""

    def __init__(self, seed: Optional[int], device: Any) -> None:
        self.seed = seed
        self.device = device
        self._fork = None

    def __enter__(self) -> None:
        if self.seed is None:
            return
        import torch

        devices = [self.device] if getattr(self.device, "type", "cpu") == "cuda" else []
        self._fork = torch.random.fork_rng(devices=devices)
        self._fork.__enter__()
        torch.manual_seed(self.seed)

    def __exit__(self, *exc_info: Any) -> None:
        if self._fork is not None:
            self._fork.__exit__(*exc_info)
            self._fork = None


def _is_out_of_memory(error: BaseException) -> bool:
    import torch

    if isinstance(error, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


def _free_cuda_cache() -> None:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
