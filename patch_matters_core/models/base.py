"""Interfaces that the stages call; every model backend implements one of them.

The stages never import transformers: they see a model only through these protocols, so a
backend for another runtime (an OpenAI-compatible server, for example) plugs in unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Protocol, Sequence, runtime_checkable

from PIL import Image

from ..config import GenerationSettings
from ..types import Detection, ModelInfo

# Called after every model call with a short label ("describe", "sort", ...). A caller that
# wants to cancel raises from it; the pipeline lets that exception through unchanged.
ProgressCallback = Callable[[str], None]


@dataclass
class Generation:
    """One generated text: ``text`` is cleaned for use, ``raw`` is the decoded output as is."""

    text: str
    raw: str
    # True when generation stopped at max_new_tokens instead of an end-of-sequence token.
    hit_token_limit: bool = False
    # True when the reply ended by repeating one passage over and over; ``raw`` and ``text`` keep
    # its first copy (see ``stopping.repetition_cut``).
    repeated: bool = False


@dataclass
class VisionRequest:
    """One image with one user prompt for a chat VLM."""

    image: Image.Image
    prompt: str


@dataclass
class ChatRequest:
    """One text-only chat turn. ``prefill`` starts the assistant's reply and is part of ``raw``."""

    user: str
    system: Optional[str] = None
    prefill: str = ""
    # Stop generating once the reply (prefill included) contains one complete JSON object or array.
    stop_after_json: bool = False


@runtime_checkable
class VisionLanguageModel(Protocol):
    info: ModelInfo
    # Shortest image side the processor accepts; smaller crops are scaled up to it.
    min_side: int

    def describe(
        self,
        requests: Sequence[VisionRequest],
        settings: GenerationSettings,
        seed: Optional[int] = None,
        progress: Optional[ProgressCallback] = None,
    ) -> list[Generation]:
        """Generate one output per request, in request order, batching as memory allows."""
        ...


@runtime_checkable
class TextModel(Protocol):
    info: ModelInfo

    def chat(
        self,
        requests: Sequence[ChatRequest],
        settings: GenerationSettings,
        seed: Optional[int] = None,
        progress: Optional[ProgressCallback] = None,
    ) -> list[Generation]:
        """Generate one output per request, in request order."""
        ...


@runtime_checkable
class Detector(Protocol):
    info: ModelInfo

    def detect(self, image: Image.Image, labels: Sequence[str]) -> list[Detection]:
        """Return every detection with its score, in original-image pixels, unthresholded."""
        ...


@runtime_checkable
class Scorer(Protocol):
    info: ModelInfo
    # Threshold above which a statement counts as confirmed by the image.
    default_threshold: float

    def score(self, image: Image.Image, texts: Sequence[str]) -> list[float]:
        """Return one image-text matching score in [0, 1] per text, in order."""
        ...
