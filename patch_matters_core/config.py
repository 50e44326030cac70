"""Settings of the pipeline in one object, with the constants of the Patch Matters paper as defaults.

The defaults follow R. Peng et al., "Patch Matters: Training-free Fine-grained Image Caption
Enhancement via Local Perception", CVPR 2025 (arXiv:2504.06666).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Optional

from .errors import ConfigError


@dataclass(frozen=True)
class GenerationSettings:
    """Sampling settings of one kind of model call; the trace records them."""

    max_new_tokens: int = 384
    temperature: float = 0.2
    top_p: float = 0.9
    do_sample: bool = True
    repetition_penalty: float = 1.05

    def validate(self, name: str) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"{name}.max_new_tokens must be at least 1, got {self.max_new_tokens}.")
        if self.temperature < 0:
            raise ConfigError(f"{name}.temperature must be 0 or more, got {self.temperature}.")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"{name}.top_p must be in (0, 1], got {self.top_p}.")


@dataclass(frozen=True)
class DivideConfig:
    detection_threshold: float = 0.3
    # When no detection passes the threshold, the best ones are kept if there are at least this many.
    fallback_detections: int = 2
    merge_iou: float = 0.3
    # Fraction of an object's own area inside a quadrant above which the quadrant grows to cover it.
    quadrant_overlap: float = 0.3
    # The semantic patch is described only when its IoU with the whole image is below this.
    semantic_max_iou: float = 0.4


@dataclass(frozen=True)
class DescribeConfig:
    num_samples: int = 3
    global_generation: GenerationSettings = GenerationSettings(max_new_tokens=512, temperature=0.2)
    sample_generation: GenerationSettings = GenerationSettings(max_new_tokens=384, temperature=0.7)
    global_prompt: str = "Describe this image in detail."
    patch_prompt: str = "Describe this part of a larger image in detail: the objects, their attributes, their positions and what they are doing."
    # Pixels sent to the VLM per image; larger crops are scaled down keeping their aspect ratio.
    max_pixels: int = 1024 * 1024
    # Crops with a shorter side are scaled up to it, because some processors fail under 28 px.
    min_side: int = 32
    # Requests per generate call; 0 sends every request of a stage in one call.
    batch_size: int = 0


@dataclass(frozen=True)
class FilterConfig:
    # ITM threshold; None takes the scorer's own default (0.3 for BLIP ITM).
    threshold: Optional[float] = None
    sorting_generation: GenerationSettings = GenerationSettings(max_new_tokens=512, temperature=0.2)
    # Word-overlap (Jaccard) above which two sentences count as the same statement when the
    # LLM's sorting is unusable and sentences are grouped without it.
    fallback_similarity: float = 0.5


@dataclass(frozen=True)
class AggregateConfig:
    merge_generation: GenerationSettings = GenerationSettings(max_new_tokens=384, temperature=0.6)
    final_generation: GenerationSettings = GenerationSettings(max_new_tokens=512, temperature=0.6)
    # Two neighbouring patches are merged at level 2 when their IoU is above this.
    pair_iou: float = 0.4


@dataclass(frozen=True)
class PipelineConfig:
    divide: DivideConfig = field(default_factory=DivideConfig)
    describe: DescribeConfig = field(default_factory=DescribeConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    aggregate: AggregateConfig = field(default_factory=AggregateConfig)
    seed: Optional[int] = 0

    def validate(self) -> "PipelineConfig":
        """Raise ConfigError naming the first invalid setting; return self otherwise."""
        for name in ("detection_threshold", "merge_iou", "quadrant_overlap", "semantic_max_iou"):
            value = getattr(self.divide, name)
            if not 0 <= value <= 1:
                raise ConfigError(f"divide.{name} must be between 0 and 1, got {value}.")
        if self.describe.num_samples < 1:
            raise ConfigError(f"describe.num_samples must be at least 1, got {self.describe.num_samples}.")
        if self.describe.max_pixels < self.describe.min_side ** 2:
            raise ConfigError(
                f"describe.max_pixels ({self.describe.max_pixels}) must be at least min_side squared "
                f"({self.describe.min_side ** 2})."
            )
        if self.describe.min_side < 1:
            raise ConfigError(f"describe.min_side must be at least 1, got {self.describe.min_side}.")
        if self.describe.batch_size < 0:
            raise ConfigError(f"describe.batch_size must be 0 (all at once) or more, got {self.describe.batch_size}.")
        if self.filter.threshold is not None and not 0 <= self.filter.threshold <= 1:
            raise ConfigError(f"filter.threshold must be between 0 and 1, got {self.filter.threshold}.")
        if not 0 < self.filter.fallback_similarity <= 1:
            raise ConfigError(f"filter.fallback_similarity must be in (0, 1], got {self.filter.fallback_similarity}.")
        if not 0 <= self.aggregate.pair_iou <= 1:
            raise ConfigError(f"aggregate.pair_iou must be between 0 and 1, got {self.aggregate.pair_iou}.")
        self.describe.global_generation.validate("describe.global_generation")
        self.describe.sample_generation.validate("describe.sample_generation")
        self.filter.sorting_generation.validate("filter.sorting_generation")
        self.aggregate.merge_generation.validate("aggregate.merge_generation")
        self.aggregate.final_generation.validate("aggregate.final_generation")
        return self

    def with_samples(self, num_samples: int) -> "PipelineConfig":
        return replace(self, describe=replace(self.describe, num_samples=num_samples))

    def with_max_new_tokens(self, max_new_tokens: int) -> "PipelineConfig":
        """Return a copy in which no model call generates more than ``max_new_tokens``."""

        def cap(settings: GenerationSettings) -> GenerationSettings:
            return replace(settings, max_new_tokens=min(settings.max_new_tokens, max_new_tokens))

        return replace(
            self,
            describe=replace(
                self.describe,
                global_generation=cap(self.describe.global_generation),
                sample_generation=cap(self.describe.sample_generation),
            ),
            filter=replace(self.filter, sorting_generation=cap(self.filter.sorting_generation)),
            aggregate=replace(
                self.aggregate,
                merge_generation=cap(self.aggregate.merge_generation),
                final_generation=cap(self.aggregate.final_generation),
            ),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PipelineConfig":
        def build(kind, values):
            kwargs = {}
            for f in fields(kind):
                if f.name not in values:
                    continue
                value = values[f.name]
                if isinstance(value, dict):
                    nested = GenerationSettings if f.type in ("GenerationSettings",) else None
                    value = build(nested, value) if nested else value
                kwargs[f.name] = value
            return kind(**kwargs)

        return cls(
            divide=build(DivideConfig, data.get("divide", {})),
            describe=build(DescribeConfig, data.get("describe", {})),
            filter=build(FilterConfig, data.get("filter", {})),
            aggregate=build(AggregateConfig, data.get("aggregate", {})),
            seed=data.get("seed", 0),
        ).validate()
