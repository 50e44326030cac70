"""The Patch Matters pipeline: divide, describe, filter and aggregate, with the run's trace."""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

from PIL import Image

from .config import PipelineConfig
from .errors import ConfigError
from .images import image_sha256, load_image
from .models.base import Detector, ProgressCallback, Scorer, TextModel, VisionLanguageModel
from .stages.aggregate import aggregate
from .stages.describe import describe, describe_global
from .stages.divide import divide
from .stages.filter import filter_descriptions
from .types import (
    Aggregation,
    Descriptions,
    FilteredDescriptions,
    ImageInfo,
    ModelInfo,
    PatchSet,
    Trace,
)

logger = logging.getLogger(__name__)

# Real models a user can download; the command line uses them when no model is named.
DEFAULT_VLM = "Qwen/Qwen2.5-VL-3B-Instruct"
DEFAULT_DETECTOR = "google/owlv2-base-patch16-ensemble"
DEFAULT_SCORER = "Salesforce/blip-itm-large-coco"


class PatchMatters:
    """Caption enhancement with one VLM, an optional separate LLM, detector and scorer.

    Without ``llm`` the VLM also does the text steps in text-only mode, so only one model
    needs memory. Without ``detector`` the image is cut into plain quadrants; without
    ``scorer`` unique statements are kept unverified. Both are recorded in the trace.
    Each stage is callable on its own with the dataclasses of ``types``.
    """

    def __init__(
        self,
        vlm: VisionLanguageModel,
        llm: Optional[TextModel] = None,
        detector: Optional[Detector] = None,
        scorer: Optional[Scorer] = None,
        config: Optional[PipelineConfig] = None,
    ) -> None:
        self.config = (config or PipelineConfig()).validate()
        self.vlm = vlm
        if llm is None:
            if not hasattr(vlm, "chat"):
                raise ConfigError(
                    "No LLM was given and the VLM cannot answer text-only requests; pass an LLM."
                )
            llm = vlm  # type: ignore[assignment]
        self.llm: TextModel = llm  # type: ignore[assignment]
        self.detector = detector
        self.scorer = scorer

    @classmethod
    def from_sources(
        cls,
        vlm: str,
        llm: Optional[str] = None,
        detector: Optional[str] = None,
        scorer: Optional[str] = None,
        device: str = "auto",
        dtype: str = "auto",
        config: Optional[PipelineConfig] = None,
        attn_implementation: Optional[str] = None,
    ) -> "PatchMatters":
        """Load the models named by local folders, GGUF files, hub ids or API specs (None skips one).

        A VLM or LLM given as ``MODEL@BASE_URL`` (or a bare ``http(s)://.../v1``) is served by an
        OpenAI-compatible API; its key comes from PATCH_MATTERS_API_KEY or OPENAI_API_KEY.
        """
        from .models.api import is_api_spec, load_api_model
        from .models.detector import load_detector
        from .models.llm import load_llm
        from .models.loading import resolve_source
        from .models.scorer import load_scorer
        from .models.vlm import load_vlm

        config = (config or PipelineConfig()).validate()

        # A mistyped path fails here, before minutes go into loading the other models.
        for role, spec in (("vlm", vlm), ("llm", llm), ("detector", detector), ("scorer", scorer)):
            if spec and not is_api_spec(spec):
                resolve_source(spec, role)

        if is_api_spec(vlm):
            vlm_model = load_api_model(vlm, role="vlm")
        else:
            vlm_model = load_vlm(vlm, device=device, dtype=dtype, attn_implementation=attn_implementation)
        llm_model = None
        if llm and is_api_spec(llm):
            llm_model = load_api_model(llm, role="llm")
        elif llm:
            llm_model = load_llm(llm, device=device, dtype=dtype)
        detector_model = load_detector(detector, device=device, dtype=dtype) if detector else None
        scorer_model = load_scorer(scorer, device=device, dtype=dtype) if scorer else None
        return cls(vlm_model, llm_model, detector_model, scorer_model, config)

    @property
    def uses_vlm_as_llm(self) -> bool:
        return self.llm is self.vlm

    def describe_global(self, image: Image.Image, progress: Optional[ProgressCallback] = None) -> str:
        text, _ = describe_global(image, self.vlm, self.config.describe, self.config.seed, progress)
        return text

    def divide(
        self, image: Image.Image, global_caption: str, progress: Optional[ProgressCallback] = None
    ) -> PatchSet:
        return divide(image, global_caption, self.detector, self.config.divide, progress=progress)

    def describe(
        self,
        image: Image.Image,
        patches: PatchSet,
        global_description: Optional[str] = None,
        progress: Optional[ProgressCallback] = None,
    ) -> Descriptions:
        return describe(
            image,
            patches,
            self.vlm,
            self.config.describe,
            seed=self.config.seed,
            progress=progress,
            global_description=global_description,
        )

    def filter(
        self, image: Image.Image, descriptions: Descriptions, progress: Optional[ProgressCallback] = None
    ) -> FilteredDescriptions:
        return filter_descriptions(
            image,
            descriptions,
            self.scorer,
            self.llm,
            self.config.filter,
            seed=self.config.seed,
            progress=progress,
        )

    def aggregate(
        self, image: Image.Image, filtered: FilteredDescriptions, progress: Optional[ProgressCallback] = None
    ) -> Aggregation:
        return aggregate(
            image,
            filtered,
            self.llm,
            self.scorer,
            self.config.aggregate,
            self.config.filter,
            seed=self.config.seed,
            progress=progress,
        )

    def run(
        self,
        image: Any,
        image_path: Optional[str] = None,
        global_caption: Optional[str] = None,
        progress: Optional[ProgressCallback] = None,
    ) -> Trace:
        """Caption one image (a path, a PIL image or an array) and return the whole trace.

        ``global_caption``, when given, is used as the global description instead of asking the
        VLM for one, for example a short caption that a user wants enhanced.
        """
        if image_path is None and isinstance(image, (str, Path)):
            image_path = str(image)
        pil_image = load_image(image)
        timings: dict[str, float] = {}
        start = time.perf_counter()
        logger.info("Captioning %s (%dx%d).", image_path or "an in-memory image", pil_image.width, pil_image.height)

        describe_fallbacks = []
        stage_start = time.perf_counter()
        if global_caption is None or not global_caption.strip():
            global_caption, describe_fallbacks = describe_global(
                pil_image, self.vlm, self.config.describe, self.config.seed, progress
            )
        timings["describe_global"] = time.perf_counter() - stage_start

        stage_start = time.perf_counter()
        patches = self.divide(pil_image, global_caption, progress)
        timings["divide"] = time.perf_counter() - stage_start

        stage_start = time.perf_counter()
        descriptions = self.describe(pil_image, patches, global_description=global_caption, progress=progress)
        descriptions.fallbacks[:0] = describe_fallbacks
        timings["describe"] = time.perf_counter() - stage_start

        stage_start = time.perf_counter()
        filtered = self.filter(pil_image, descriptions, progress)
        timings["filter"] = time.perf_counter() - stage_start

        stage_start = time.perf_counter()
        aggregation = self.aggregate(pil_image, filtered, progress)
        timings["aggregate"] = time.perf_counter() - stage_start
        timings["total"] = time.perf_counter() - start

        trace = self._build_trace(pil_image, image_path, patches, descriptions, filtered, aggregation, timings)
        logger.info(
            "Captioned %s: %d characters, %d fallbacks, in %.1f s.",
            image_path or "an in-memory image",
            len(trace.caption),
            len(trace.fallbacks),
            timings["total"],
        )
        return trace

    def model_infos(self) -> dict[str, ModelInfo]:
        infos = {"vlm": self.vlm.info}
        if self.uses_vlm_as_llm:
            infos["llm"] = replace(self.vlm.info, role="llm", family=f"{self.vlm.info.family} (the VLM, text only)")
        else:
            infos["llm"] = self.llm.info
        infos["detector"] = self.detector.info if self.detector else ModelInfo(role="detector", source=None)
        infos["scorer"] = self.scorer.info if self.scorer else ModelInfo(role="scorer", source=None)
        return infos

    def _build_trace(
        self,
        image: Image.Image,
        image_path: Optional[str],
        patches: PatchSet,
        descriptions: Descriptions,
        filtered: FilteredDescriptions,
        aggregation: Aggregation,
        timings: dict[str, float],
    ) -> Trace:
        statements = [s for filtered_set in filtered.sets.values() for s in filtered_set.statements]
        statements.extend(aggregation.statements)
        fallbacks = patches.fallbacks + descriptions.fallbacks + filtered.fallbacks + aggregation.fallbacks
        return Trace(
            image=ImageInfo(path=image_path, sha256=image_sha256(image), width=image.width, height=image.height),
            patches=list(patches.patches),
            descriptions=descriptions.samples,
            statements=statements,
            levels=aggregation.levels,
            fallbacks=fallbacks,
            models=self.model_infos(),
            timings={name: round(seconds, 3) for name, seconds in timings.items()},
            caption=aggregation.caption,
            global_caption=descriptions.global_description,
            detections=patches.detections,
            sorting={name: s.sorting_path for name, s in filtered.sets.items()},
            config=self.config.to_dict(),
        )
