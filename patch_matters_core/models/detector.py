"""Zero-shot object detectors that find boxes for free-text labels: OWLv2, OWL-ViT, Grounding DINO.

``load_detector(spec)`` loads a model folder or hub id with ``AutoProcessor`` and
``AutoModelForZeroShotObjectDetection`` and returns a ``ZeroShotDetector``. Its ``detect``
returns boxes in pixels of the original image, clipped to it, each with a label from the
query list and a score in [0, 1]. It applies no score threshold: the divide stage does.

The families differ in how boxes and labels come back:

- OWLv2 and OWL-ViT score every label separately for each of a fixed set of boxes. Each
  label is one text query of at most ``model_max_length`` tokens (16 for the released models).
  OWLv2 pads the image to a square at the bottom and right before resizing, so its boxes are
  relative to that square. OWL-ViT stretches the image, so its boxes are relative to the image.
- Grounding DINO reads all labels as one sentence ("cat. dog.") and scores every token.
  A label's score for a box is the highest score of its tokens. Its boxes are relative to the
  image.

Images with a side below ``MIN_DETECTOR_SIDE`` pixels or an aspect ratio above
``MAX_DETECTOR_ASPECT_RATIO`` are upscaled and padded at the bottom and right before
detection, and the boxes are mapped back to the original pixels.

torch and transformers are imported inside the functions that need them.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from PIL import Image

from ..errors import ModelLoadError
from ..images import BACKGROUND_RGB
from ..types import Box, Detection, ModelInfo
from . import loading

logger = logging.getLogger(__name__)

ROLE = "detector"

OWL_TYPES = ("owlv2", "owlvit")
# NOTE: mm-grounding-dino shares the Grounding DINO processor and outputs, but no model of
# that type has been run with this code.
GROUNDING_DINO_TYPES = ("grounding-dino", "mm-grounding-dino")
SUPPORTED_FAMILIES = "OWLv2 (owlv2), OWL-ViT (owlvit), Grounding DINO (grounding-dino, mm-grounding-dino)"

# Text queries per OWL forward pass. The boxes do not depend on the text, so chunks of
# labels are merged box by box.
DEFAULT_OWL_QUERIES_PER_CALL = 32
# Detections kept per image, best scores first. Without a cap, OWLv2 base (960 px images in
# 16 px patches) returns 3600 boxes per image, and every one of them would land in the trace.
DEFAULT_MAX_DETECTIONS = 100

# Smallest image side given to a detector, in pixels. transformers' image processors guess
# that an array is channels-first when a dimension has size 1, 3 or 4. The OWLv2 processor
# pads and resizes with that guess, so a 1- or 3-pixel side logs a warning or transposes the
# image. Smaller images are upscaled, up to a long side of MAX_UPSCALED_SIDE, then padded.
MIN_DETECTOR_SIDE = 32
MAX_UPSCALED_SIDE = 1024
# Largest ratio of long to short side given to a detector. Grounding DINO's processor fits
# the long side into its longest_edge (1333 px by default in transformers 5.25), so the short
# side of a 2000x3 strip rounds to 0 px and the processor raises ValueError. Longer images
# are padded on the short side down to this ratio.
MAX_DETECTOR_ASPECT_RATIO = 8.0


@dataclass(frozen=True)
class _Label:
    """A query label as the caller wrote it and as the model reads it."""

    label: str
    query: str


class ZeroShotDetector:
    """A loaded zero-shot detector; ``detect`` finds boxes for free-text labels in one image.

    ``max_detections`` (None for no cap) and ``owl_queries_per_call`` may be changed after
    loading. ``model`` is the torch module. Inputs go to the device of its parameters at call time,
    so a memory manager may move the module between devices.
    """

    def __init__(
        self,
        model: Any,
        processor: Any,
        info: ModelInfo,
        max_detections: Optional[int] = DEFAULT_MAX_DETECTIONS,
        owl_queries_per_call: int = DEFAULT_OWL_QUERIES_PER_CALL,
    ) -> None:
        self.model = model
        self.processor = processor
        self.info = info
        self.family = info.family or ""
        self.max_detections = max_detections
        self.owl_queries_per_call = max(1, int(owl_queries_per_call))

    def detect(self, image: Image.Image, labels: Sequence[str]) -> list[Detection]:
        """Return detections for ``labels``, best score first, at most ``max_detections``.

        Each box gets the label with its highest score. Scores are probabilities in [0, 1]
        and are not thresholded. Boxes are in pixels of ``image``, clipped to it, and boxes
        with no area inside the image are dropped. Empty and repeated labels are skipped.
        """
        if self.model is None:
            raise ModelLoadError(
                f"detector model {self.info.source} was released; load it again with load_detector()."
            )
        queries = self._queries(labels)
        if not queries:
            return []
        if image.mode != "RGB":
            image = image.convert("RGB")

        start = time.perf_counter()
        # The processors get PIL images, which they read as height x width x channels
        # without guessing. The OWLv2 processor guesses again when it pads and resizes, and
        # input_data_format does not reach those steps, so prepare_detector_image keeps every
        # side at MIN_DETECTOR_SIDE or more.
        prepared, scale_x, scale_y = prepare_detector_image(image)
        if self.family in OWL_TYPES:
            detections = self._detect_owl(prepared, queries)
        else:
            detections = self._detect_grounding_dino(prepared, queries)
        if prepared is not image:
            detections = detections_to_original(detections, scale_x, scale_y, image.width, image.height)

        detections.sort(key=lambda detection: detection.score, reverse=True)
        if self.max_detections is not None:
            detections = detections[: self.max_detections]
        logger.info(
            "Detector %s found %d boxes for %d labels in a %dx%d image in %.2f s.",
            self.info.source,
            len(detections),
            len(queries),
            image.width,
            image.height,
            time.perf_counter() - start,
        )
        return detections

    def release(self) -> None:
        """Free the weights and drop this detector from the cache; later calls to ``detect`` raise."""
        if self.model is None:
            return
        loading.discard(self)
        self.model = None
        self.processor = None
        _empty_cuda_cache()
        logger.info("Released detector model %s.", self.info.source)

    def _queries(self, labels: Sequence[str]) -> list[_Label]:
        if isinstance(labels, str):
            raise TypeError(f"labels must be a list of strings, got the string {labels!r}.")

        queries: list[_Label] = []
        seen: set[str] = set()
        for label in labels:
            text = " ".join(str(label).split())
            if not text:
                logger.warning("Skipped an empty detector label.")
                continue
            key = text.lower()
            if key in seen:
                continue
            seen.add(key)
            if self.family in GROUNDING_DINO_TYPES:
                # Grounding DINO reads lowercase phrases, each ended by ".", so a period inside
                # a label would split it in two.
                query = key.strip(". ").replace(".", ",")
            else:
                query = text
            if not query:
                logger.warning("Skipped detector label %r: it has no words.", text)
                continue
            queries.append(_Label(label=text, query=query))
        return queries

    def _device_and_dtype(self) -> tuple[Any, Any]:
        parameter = next(self.model.parameters())
        return parameter.device, parameter.dtype

    def _to_model(self, inputs: Any) -> dict[str, Any]:
        device, dtype = self._device_and_dtype()
        moved = {}
        for name, value in inputs.items():
            if value.is_floating_point():
                moved[name] = value.to(device=device, dtype=dtype)
            else:
                moved[name] = value.to(device)
        return moved

    def _detect_owl(self, image: Image.Image, queries: list[_Label]) -> list[Detection]:
        import torch

        tokenizer = self.processor.tokenizer
        max_tokens = _token_limit(tokenizer, self.model.config.text_config)
        for query in queries:
            count = len(tokenizer(query.query)["input_ids"])
            if count > max_tokens:
                logger.warning(
                    "Detector label %r has %d tokens; %s reads only the first %d.",
                    query.label,
                    count,
                    self.info.source,
                    max_tokens,
                )

        best_scores: Any = None
        best_labels: Any = None
        relative_boxes: Any = None
        for offset in range(0, len(queries), self.owl_queries_per_call):
            chunk = queries[offset : offset + self.owl_queries_per_call]
            inputs = self.processor(
                images=image,
                text=[[query.query for query in chunk]],
                return_tensors="pt",
                padding="max_length",
                truncation=True,
                max_length=max_tokens,
            )
            with torch.inference_mode():
                outputs = self.model(**self._to_model(inputs))

            # logits: (1, boxes, labels of this chunk); pred_boxes: (1, boxes, 4) as cx, cy, w, h.
            scores = outputs.logits[0].float().sigmoid()
            chunk_scores, chunk_labels = scores.max(dim=-1)
            chunk_labels = chunk_labels + offset
            if best_scores is None:
                best_scores, best_labels = chunk_scores, chunk_labels
                relative_boxes = outputs.pred_boxes[0].float()
            else:
                better = chunk_scores > best_scores
                best_scores = torch.where(better, chunk_scores, best_scores)
                best_labels = torch.where(better, chunk_labels, best_labels)

        boxes = relative_boxes_to_pixels(
            relative_boxes.cpu().tolist(),
            image.width,
            image.height,
            padded_square=self.family == "owlv2",
        )
        return _detections(boxes, best_scores.cpu().tolist(), best_labels.cpu().tolist(), queries)

    def _detect_grounding_dino(self, image: Image.Image, queries: list[_Label]) -> list[Detection]:
        import torch

        tokenizer = self.processor.tokenizer
        max_tokens = min(
            _token_limit(tokenizer, self.model.config.text_config),
            int(getattr(self.model.config, "max_text_len", 256)),
        )

        detections: list[Detection] = []
        for chunk in _grounding_chunks(queries, tokenizer, max_tokens):
            prompt, spans = _grounding_prompt(chunk)
            inputs = self.processor(
                images=image, text=prompt, return_tensors="pt", truncation=True, max_length=max_tokens
            )
            encoding = tokenizer(prompt, truncation=True, max_length=max_tokens, return_offsets_mapping=True)
            positions = _label_token_positions(encoding["offset_mapping"], spans)
            for index, found in enumerate(positions):
                if not found:
                    logger.warning(
                        "Detector label %r did not fit in the %d-token text of %s and was not searched for.",
                        chunk[index].label,
                        max_tokens,
                        self.info.source,
                    )

            with torch.inference_mode():
                outputs = self.model(**self._to_model(inputs))

            # logits: (1, queries, max_text_len) over text tokens; pred_boxes: (1, queries, 4) as cx, cy, w, h.
            token_scores = outputs.logits[0].float().sigmoid()
            label_scores = torch.zeros(token_scores.shape[0], len(chunk), device=token_scores.device)
            for index, found in enumerate(positions):
                if found:
                    label_scores[:, index] = token_scores[:, found].max(dim=-1).values
            scores, labels = label_scores.max(dim=-1)

            boxes = relative_boxes_to_pixels(
                outputs.pred_boxes[0].float().cpu().tolist(), image.width, image.height, padded_square=False
            )
            detections.extend(_detections(boxes, scores.cpu().tolist(), labels.cpu().tolist(), chunk))
        return detections


def prepare_detector_image(
    image: Image.Image,
    min_side: int = MIN_DETECTOR_SIDE,
    max_aspect_ratio: float = MAX_DETECTOR_ASPECT_RATIO,
) -> tuple[Image.Image, float, float]:
    """Upscale and pad an image that is too small or too long for a detector's processor.

    Returns the image to detect on and the factors ``(scale_x, scale_y)`` that multiply pixel
    coordinates of ``image`` into pixel coordinates of that image. An image with both sides >= ``min_side`` and an
    aspect ratio <= ``max_aspect_ratio`` is returned unchanged with factors 1.0.

    Otherwise the image is upscaled until its short side is ``min_side``, unless the long
    side would then exceed ``MAX_UPSCALED_SIDE`` (it is upscaled less, never shrunk). Then
    the image is padded with ``BACKGROUND_RGB`` at the right and bottom until both sides are
    >= ``min_side`` and the aspect ratio is <= ``max_aspect_ratio``. The original pixels
    stay at the top left, so a prepared coordinate x maps back to x / scale_x.
    """
    width, height = image.size
    short_side, long_side = min(width, height), max(width, height)
    if short_side >= min_side and long_side <= short_side * max_aspect_ratio:
        return image, 1.0, 1.0

    scale = 1.0
    if short_side < min_side:
        scale = max(1.0, min(min_side / short_side, MAX_UPSCALED_SIDE / long_side))
    scaled_width = max(1, round(width * scale))
    scaled_height = max(1, round(height * scale))
    scaled = image
    if (scaled_width, scaled_height) != (width, height):
        scaled = image.resize((scaled_width, scaled_height), resample=Image.Resampling.BICUBIC)

    min_short_side = max(min_side, math.ceil(max(scaled_width, scaled_height) / max_aspect_ratio))
    padded_width = max(scaled_width, min_short_side)
    padded_height = max(scaled_height, min_short_side)
    prepared = scaled
    if (padded_width, padded_height) != scaled.size:
        prepared = Image.new("RGB", (padded_width, padded_height), BACKGROUND_RGB)
        prepared.paste(scaled, (0, 0))

    logger.debug(
        "Prepared a %dx%d image as %dx%d for the detector (upscaled to %dx%d, then padded).",
        width,
        height,
        padded_width,
        padded_height,
        scaled_width,
        scaled_height,
    )
    return prepared, scaled_width / width, scaled_height / height


def detections_to_original(
    detections: list[Detection], scale_x: float, scale_y: float, width: int, height: int
) -> list[Detection]:
    """Map detections on an image from ``prepare_detector_image`` back to the original pixels.

    Boxes are divided by the scale factors and clipped to ``width`` x ``height``. Boxes that
    lie wholly in the padding are dropped.
    """
    mapped = []
    for detection in detections:
        box = detection.box
        x0 = min(max(box.x0 / scale_x, 0.0), float(width))
        y0 = min(max(box.y0 / scale_y, 0.0), float(height))
        x1 = min(max(box.x1 / scale_x, 0.0), float(width))
        y1 = min(max(box.y1 / scale_y, 0.0), float(height))
        if x1 > x0 and y1 > y0:
            mapped.append(Detection(label=detection.label, score=detection.score, box=Box(x0, y0, x1, y1)))

    dropped = len(detections) - len(mapped)
    if dropped:
        logger.debug("Dropped %d predicted boxes that lie in the padding of a small or long image.", dropped)
    return mapped


def relative_boxes_to_pixels(
    boxes: Sequence[Sequence[float]], width: int, height: int, padded_square: bool
) -> list[Optional[Box]]:
    """Convert relative ``(cx, cy, w, h)`` boxes to ``Box`` objects in pixels of the image.

    With ``padded_square`` the boxes are relative to the image padded at the bottom and right
    to a square of side ``max(width, height)``, as the OWLv2 image processor pads it. Otherwise they are relative to
    the image itself. Boxes are clipped to the image; a box with no area inside it becomes None.
    """
    scale_x = float(max(width, height)) if padded_square else float(width)
    scale_y = float(max(width, height)) if padded_square else float(height)

    result: list[Optional[Box]] = []
    for center_x, center_y, box_width, box_height in boxes:
        x0 = min(max((center_x - box_width / 2) * scale_x, 0.0), float(width))
        y0 = min(max((center_y - box_height / 2) * scale_y, 0.0), float(height))
        x1 = min(max((center_x + box_width / 2) * scale_x, 0.0), float(width))
        y1 = min(max((center_y + box_height / 2) * scale_y, 0.0), float(height))
        result.append(Box(x0, y0, x1, y1) if x1 > x0 and y1 > y0 else None)
    return result


def _detections(
    boxes: list[Optional[Box]], scores: list[float], label_indices: list[int], queries: list[_Label]
) -> list[Detection]:
    detections = []
    for box, score, label_index in zip(boxes, scores, label_indices):
        if box is not None:
            detections.append(Detection(label=queries[label_index].label, score=float(score), box=box))
    dropped = len(boxes) - len(detections)
    if dropped:
        logger.debug("Dropped %d predicted boxes that lie outside the image.", dropped)
    return detections


def _token_limit(tokenizer: Any, text_config: Any) -> int:
    """Return the maximum number of tokens of a text query: the smaller of the tokenizer's and the model's limit."""
    limits = [int(getattr(text_config, "max_position_embeddings", 0) or 0)]
    tokenizer_limit = getattr(tokenizer, "model_max_length", None)
    # Tokenizers without a limit report a huge placeholder value (about 1e30).
    if tokenizer_limit is not None and tokenizer_limit < 100_000:
        limits.append(int(tokenizer_limit))
    limits = [limit for limit in limits if limit > 0]
    return min(limits) if limits else 512


def _grounding_prompt(chunk: list[_Label]) -> tuple[str, list[tuple[int, int]]]:
    """Join labels into one Grounding DINO text ("cat. dog.") and return each label's character span."""
    parts: list[str] = []
    spans: list[tuple[int, int]] = []
    position = 0
    for query in chunk:
        spans.append((position, position + len(query.query)))
        part = f"{query.query}."
        parts.append(part)
        position += len(part) + 1
    return " ".join(parts), spans


def _grounding_chunks(queries: list[_Label], tokenizer: Any, max_tokens: int) -> list[list[_Label]]:
    """Split labels into groups whose joined text fits in ``max_tokens`` with the special tokens.

    A label too long on its own gets a group of its own and is cut by truncation.
    """
    budget = max(1, max_tokens - 2)
    chunks: list[list[_Label]] = []
    current: list[_Label] = []
    used = 0
    for query in queries:
        count = len(tokenizer(f"{query.query}.", add_special_tokens=False)["input_ids"])
        if current and used + count > budget:
            chunks.append(current)
            current, used = [], 0
        if count > budget:
            logger.warning(
                "Detector label %r has %d tokens, more than the %d the text encoder reads; it is cut.",
                query.label,
                count,
                budget,
            )
        current.append(query)
        used += count
    if current:
        chunks.append(current)
    return chunks


def _label_token_positions(offsets: Sequence[Sequence[int]], spans: list[tuple[int, int]]) -> list[list[int]]:
    """Return, for each character span, the positions of the tokens inside it."""
    positions: list[list[int]] = [[] for _ in spans]
    for token_index, (start, end) in enumerate(offsets):
        if end <= start:
            # Special tokens have the empty offset (0, 0).
            continue
        for label_index, (span_start, span_end) in enumerate(spans):
            if start >= span_start and end <= span_end:
                positions[label_index].append(token_index)
                break
    return positions


def _empty_cuda_cache() -> None:
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def load_detector(
    spec: str,
    device: str = "auto",
    dtype: Any = "auto",
) -> ZeroShotDetector:
    """Load a zero-shot detector from a model folder or hub id, cached per process.

    Raises ModelLoadError when the model cannot be found or is not an OWLv2, OWL-ViT or
    Grounding DINO model, and MissingDependencyError when its processor needs a package
    that is not installed (the OWLv2 image processor without torchvision needs scipy).
    """
    return loading.load_cached(spec, ROLE, device, dtype, _build_detector)


def _build_detector(source: loading.ModelSource, device: str, dtype: Any) -> ZeroShotDetector:
    from transformers import AutoConfig, AutoModelForZeroShotObjectDetection

    start = time.perf_counter()
    logger.info("Loading detector model %s on %s (%s).", source.location, device, loading.dtype_name(dtype))

    config = loading.from_pretrained(AutoConfig, source, ROLE)
    model_type = getattr(config, "model_type", None)
    if model_type not in OWL_TYPES + GROUNDING_DINO_TYPES:
        raise ModelLoadError(
            f"detector model '{source.spec}' has model type '{model_type}', which is not a supported "
            f"zero-shot detector. Supported families: {SUPPORTED_FAMILIES}. Pass a model of one of "
            "them, for example google/owlv2-base-patch16-ensemble or IDEA-Research/grounding-dino-tiny."
        )

    processor = loading.load_processor(source, ROLE)

    model = loading.from_pretrained(AutoModelForZeroShotObjectDetection, source, ROLE, dtype=dtype)
    model = model.to(device).eval()

    info = ModelInfo(
        role=ROLE,
        source=source.location,
        family=model_type,
        dtype=loading.dtype_name(dtype),
        device=device,
    )
    logger.info(
        "Loaded detector model %s (%s) in %.1f s.", source.location, model_type, time.perf_counter() - start
    )
    return ZeroShotDetector(model, processor, info)
