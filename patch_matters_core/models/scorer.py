"""Image-text matching scorers that rate how well a statement fits an image: BLIP ITM, CLIP, SigLIP.

``load_scorer(spec)`` loads a model folder or hub id and returns an ``ImageTextScorer``. Its
``score`` returns one number in [0, 1] per text, and its ``default_threshold`` is the score
above which the filter stage counts a statement as confirmed by the image. Each family
defines its own score:

- BLIP ITM (``BlipForImageTextRetrieval``): the mean of the ITM head's "match" probability
  and the ITC head's cosine similarity, clamped to [0, 1].
- CLIP (``CLIPModel``): the cosine similarity of the image and text embeddings, clamped to [0, 1].
- SigLIP (``SiglipModel``): the sigmoid of the image-text logit, the match probability SigLIP
  is trained to output.

Texts are scored in batches and cut to the text tower's maximum length, so a long statement
is scored by its beginning. An empty text scores 0.0 without a model call.

torch and transformers are imported inside the functions that need them.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Sequence

from PIL import Image

from ..errors import ModelLoadError
from ..types import ModelInfo
from . import loading

logger = logging.getLogger(__name__)

ROLE = "scorer"

BLIP = "blip"
CLIP = "clip"
SIGLIP = "siglip"
SUPPORTED_FAMILIES = (
    "BLIP image-text matching (BlipForImageTextRetrieval), CLIP (CLIPModel), SigLIP (SiglipModel)"
)

# Model class of each family, by name in transformers.
MODEL_CLASSES = {BLIP: "BlipForImageTextRetrieval", CLIP: "CLIPModel", SIGLIP: "SiglipModel"}

# Patch Matters (R. Peng et al., CVPR 2025) keeps a statement whose BLIP score is above 0.3.
# Its reference code computes that score with LAVIS BLIP ITM large, as the mean of the two
# heads (github.com/planetyoon/Patch-Matters, merge_module/blip_model.py).
BLIP_THRESHOLD = 0.3
# NOTE: estimate, not measured or calibrated. It assumes that a statement which fits the
# image reaches a CLIP cosine similarity of 0.2.
CLIP_THRESHOLD = 0.2
# NOTE: estimate, not measured or calibrated. SigLIP's match probability of a true but
# narrow statement can be far below 0.5, so the threshold is low.
SIGLIP_THRESHOLD = 0.1
DEFAULT_THRESHOLDS = {BLIP: BLIP_THRESHOLD, CLIP: CLIP_THRESHOLD, SIGLIP: SIGLIP_THRESHOLD}

DEFAULT_BATCH_SIZE = 32


class ImageTextScorer:
    """A loaded image-text matching model; ``score`` rates texts against one image.

    ``batch_size`` (texts per forward pass) may be changed after loading. ``model`` is the
    torch module. Inputs go to the device of its parameters at call time, so a memory
    manager may move the module between devices.
    """

    def __init__(self, model: Any, processor: Any, family: str, info: ModelInfo) -> None:
        if family not in MODEL_CLASSES:
            raise ValueError(f"Unknown scorer family {family!r}; expected one of {sorted(MODEL_CLASSES)}.")
        self.model = model
        self.processor = processor
        self.family = family
        self.info = info
        self.default_threshold = DEFAULT_THRESHOLDS[family]
        self.batch_size = DEFAULT_BATCH_SIZE
        self.max_text_tokens = _text_token_limit(processor.tokenizer, model.config.text_config)

    def score(self, image: Image.Image, texts: Sequence[str]) -> list[float]:
        """Return one score in [0, 1] per text, in order; an empty or blank text scores 0.0."""
        if self.model is None:
            raise ModelLoadError(f"scorer model {self.info.source} was released; load it again with load_scorer().")
        if isinstance(texts, str):
            raise TypeError(f"texts must be a list of strings, got the string {texts!r}.")
        texts = [" ".join(str(text).split()) for text in texts]
        if not texts:
            return []

        scores = [0.0] * len(texts)
        indices = [index for index, text in enumerate(texts) if text]
        if not indices:
            return scores
        if image.mode != "RGB":
            image = image.convert("RGB")

        start = time.perf_counter()
        pixel_values = self._pixel_values(image)
        batch_size = max(1, int(self.batch_size))
        image_state = self._encode_image(pixel_values) if self.family == BLIP else None
        for offset in range(0, len(indices), batch_size):
            chunk = indices[offset : offset + batch_size]
            chunk_scores = self._score_batch(pixel_values, image_state, [texts[i] for i in chunk])
            for index, value in zip(chunk, chunk_scores):
                scores[index] = min(1.0, max(0.0, float(value)))

        logger.info(
            "Scorer %s scored %d texts in %.2f s.", self.info.source, len(indices), time.perf_counter() - start
        )
        return scores

    def release(self) -> None:
        """Free the weights and drop this scorer from the cache; later calls to ``score`` raise."""
        if self.model is None:
            return
        loading.discard(self)
        self.model = None
        self.processor = None
        _empty_cuda_cache()
        logger.info("Released scorer model %s.", self.info.source)

    def _device_and_dtype(self) -> tuple[Any, Any]:
        parameter = next(self.model.parameters())
        return parameter.device, parameter.dtype

    def _pixel_values(self, image: Image.Image) -> Any:
        device, dtype = self._device_and_dtype()
        pixel_values = self.processor.image_processor(images=image, return_tensors="pt")["pixel_values"]
        return pixel_values.to(device=device, dtype=dtype)

    def _tokenize(self, texts: list[str]) -> dict[str, Any]:
        # SigLIP was trained on texts padded to the maximum length, and it pools the last
        # token, so its texts are padded the same way. Other families pad to the longest text.
        padding = "max_length" if self.family == SIGLIP else "longest"
        encoding = self.processor.tokenizer(
            texts,
            padding=padding,
            truncation=True,
            max_length=self.max_text_tokens,
            return_tensors="pt",
        )
        device, _ = self._device_and_dtype()
        return {name: value.to(device) for name, value in encoding.items() if name in ("input_ids", "attention_mask")}

    def _encode_image(self, pixel_values: Any) -> Any:
        """Run the BLIP vision tower once per image; every batch of texts reuses its output."""
        import torch

        with torch.inference_mode():
            return self.model.vision_model(pixel_values=pixel_values).last_hidden_state

    def _score_batch(self, pixel_values: Any, image_state: Any, texts: list[str]) -> list[float]:
        import torch

        inputs = self._tokenize(texts)
        with torch.inference_mode():
            if self.family == BLIP:
                values = self._blip_scores(image_state, inputs)
            elif self.family == CLIP:
                outputs = self.model(pixel_values=pixel_values, **inputs)
                # image_embeds and text_embeds are L2-normalised, so the product is the cosine.
                values = (outputs.text_embeds.float() @ outputs.image_embeds.float().T)[:, 0]
            else:
                outputs = self.model(pixel_values=pixel_values, **inputs)
                values = outputs.logits_per_image[0].float().sigmoid()
        return values.cpu().tolist()

    def _blip_scores(self, image_embeds: Any, inputs: dict[str, Any]) -> Any:
        """Return (ITM match probability + ITC cosine) / 2 for each text against one image.

        This runs the two heads of ``BlipForImageTextRetrieval.forward`` with the image encoded
        once, instead of once per text.
        """
        import torch
        from torch.nn.functional import normalize

        count = inputs["input_ids"].shape[0]
        image_batch = image_embeds.expand(count, -1, -1)
        image_mask = torch.ones(image_batch.shape[:-1], dtype=torch.long, device=image_batch.device)

        fused = self.model.text_encoder(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            encoder_hidden_states=image_batch,
            encoder_attention_mask=image_mask,
        ).last_hidden_state
        match_probability = self.model.itm_head(fused[:, 0, :]).float().softmax(dim=-1)[:, 1]

        text_only = self.model.text_encoder(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
        ).last_hidden_state
        image_feature = normalize(self.model.vision_proj(image_embeds[:, 0, :]).float(), dim=-1)
        text_feature = normalize(self.model.text_proj(text_only[:, 0, :]).float(), dim=-1)
        cosine = (text_feature @ image_feature.T)[:, 0]

        return (match_probability + cosine) / 2


def _text_token_limit(tokenizer: Any, text_config: Any) -> int:
    """Return the maximum number of tokens of a text: the smaller of the tokenizer's and the model's limit."""
    limits = []
    positions = getattr(text_config, "max_position_embeddings", None)
    if positions:
        limits.append(int(positions))
    tokenizer_limit = getattr(tokenizer, "model_max_length", None)
    # Tokenizers without a limit report a huge placeholder value (about 1e30).
    if tokenizer_limit is not None and tokenizer_limit < 100_000:
        limits.append(int(tokenizer_limit))
    return min(limits) if limits else 512


def _empty_cuda_cache() -> None:
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def scorer_family(config: Any) -> str:
    """Return the family (blip, clip, siglip) of a transformers config, or raise ModelLoadError."""
    model_type = getattr(config, "model_type", None)
    architectures = list(getattr(config, "architectures", None) or [])
    if model_type == "blip":
        if "BlipForImageTextRetrieval" in architectures:
            return BLIP
        raise ModelLoadError(
            f"BLIP model with architectures {architectures} has no image-text matching head. "
            "Pass a BLIP ITM model (BlipForImageTextRetrieval), for example Salesforce/blip-itm-large-coco."
        )
    if model_type == "clip":
        return CLIP
    if model_type == "siglip":
        return SIGLIP
    raise ModelLoadError(
        f"model type '{model_type}' (architectures {architectures}) is not a supported image-text "
        f"matching model. Supported families: {SUPPORTED_FAMILIES}."
    )


def load_scorer(spec: str, device: str = "auto", dtype: Any = "auto") -> ImageTextScorer:
    """Load an image-text matching scorer from a model folder or hub id, cached per process.

    Raises ModelLoadError when the model cannot be found or is not a BLIP ITM, CLIP or
    SigLIP model, and MissingDependencyError when its processor needs a package that is not
    installed (the SigLIP tokenizer needs sentencepiece and protobuf).
    """
    return loading.load_cached(spec, ROLE, device, dtype, _build_scorer)


def _build_scorer(source: loading.ModelSource, device: str, dtype: Any) -> ImageTextScorer:
    import transformers
    from transformers import AutoConfig

    start = time.perf_counter()
    logger.info("Loading scorer model %s on %s (%s).", source.location, device, loading.dtype_name(dtype))

    config = loading.from_pretrained(AutoConfig, source, ROLE)
    try:
        family = scorer_family(config)
    except ModelLoadError as error:
        raise ModelLoadError(f"scorer model '{source.spec}': {error}") from error

    processor = loading.load_processor(source, ROLE)

    model_class = getattr(transformers, MODEL_CLASSES[family])
    model = loading.from_pretrained(model_class, source, ROLE, dtype=dtype)
    model = model.to(device).eval()

    info = ModelInfo(
        role=ROLE,
        source=source.location,
        family=family,
        dtype=loading.dtype_name(dtype),
        device=device,
    )
    logger.info("Loaded scorer model %s (%s) in %.1f s.", source.location, family, time.perf_counter() - start)
    return ImageTextScorer(model, processor, family, info)
