"""The four stage nodes of Patch Matters and the all-in-one caption node.

Every node takes lists (INPUT_IS_LIST) and returns lists (OUTPUT_IS_LIST), so an IMAGE batch
or a list of images of different sizes gives one result per image. Widget values arrive as
one-item lists and are read with ``first``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from typing import Any, Optional

from PIL import Image

from patch_matters_core.config import DescribeConfig, PipelineConfig
from patch_matters_core.types import GLOBAL, Descriptions, FilteredDescriptions, PatchSet

from .models import ModelHandle, use_model
from .preview import draw_patches
from .report import filter_report
from .runtime import NodeProgress, first, flatten, images_to_pil, pair_up, pil_to_image

logger = logging.getLogger(__name__)

CATEGORY = "Patch Matters"
MAX_SEED = 2**31 - 1

# Estimated model calls of the filter and aggregate stages per image, for the progress bar:
# sorting and its retry, scoring, per-patch merges, neighbour merges and the final merge.
FILTER_CALLS_PER_IMAGE = 4
AGGREGATE_CALLS_PER_IMAGE = 12


@dataclass
class DescribedImage:
    """Value of a PM_DESCRIPTIONS link: the descriptions with the image they describe.

    ``vlm`` is the VLM that wrote them. Later nodes use it for the text steps when no LLM
    is connected.
    """

    image: Image.Image
    descriptions: Descriptions
    vlm: Optional[ModelHandle]


@dataclass
class FilteredImage:
    """Value of a PM_FILTERED link: the filtered descriptions with their image."""

    image: Image.Image
    filtered: FilteredDescriptions
    vlm: Optional[ModelHandle]


def _seed_input() -> tuple[str, dict[str, Any]]:
    return (
        "INT",
        {
            "default": 0,
            "min": 0,
            "max": MAX_SEED,
            "tooltip": "Seed of the sampled generations; the same seed and inputs give the same text.",
        },
    )


def _max_tokens_input(default: int, scope: str) -> tuple[str, dict[str, Any]]:
    return (
        "INT",
        {"default": default, "min": 1, "max": 4096, "step": 1, "tooltip": f"Maximum number of tokens {scope}."},
    )


def _describe_config(base: DescribeConfig, samples: int, temperature: float, prompt: str, max_new_tokens: int,
                     batch_size: int) -> DescribeConfig:
    prompt_text = prompt.strip() or base.patch_prompt
    return replace(
        base,
        num_samples=samples,
        patch_prompt=prompt_text,
        batch_size=batch_size,
        global_generation=replace(base.global_generation, max_new_tokens=max_new_tokens),
        sample_generation=replace(base.sample_generation, max_new_tokens=max_new_tokens, temperature=temperature),
    )


def _text_model_handle(llm: Optional[ModelHandle], vlm: Optional[ModelHandle], node: str) -> ModelHandle:
    """Return the LLM handle, or the describing VLM's when no LLM is connected."""
    if llm is not None:
        return llm
    if vlm is None:
        raise ValueError(f"{node} needs a text model: connect an LLM loader to its llm input.")
    return vlm


def _captions_result(captions: list[str], *others: list[Any]) -> dict[str, Any]:
    return {"ui": {"text": captions}, "result": (captions, *others)}


class PatchMattersDivide:
    DESCRIPTION = (
        "Cuts each image into the patches that Patch Matters describes: four quadrants grown to "
        "cover the objects that lie mostly inside them, and a semantic patch around the objects "
        "the global caption names. The preview shows every patch box with its name."
    )
    CATEGORY = CATEGORY
    FUNCTION = "divide"
    INPUT_IS_LIST = True
    RETURN_TYPES = ("PM_PATCHES", "IMAGE")
    RETURN_NAMES = ("patches", "preview")
    OUTPUT_IS_LIST = (True, True)
    OUTPUT_TOOLTIPS = ("The patches of each image.", "Each image with its patch boxes drawn and labelled.")

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        defaults = PipelineConfig().divide
        return {
            "required": {
                "image": ("IMAGE", {"tooltip": "The image or image batch to divide."}),
                "detector": ("PM_DETECTOR", {"tooltip": "The detector from the detector loader (it may be 'none')."}),
                "detection_threshold": (
                    "FLOAT",
                    {
                        "default": defaults.detection_threshold,
                        "min": 0.0,
                        "max": 1.0,
                        "step": 0.01,
                        "tooltip": "Detections with a lower score are ignored.",
                    },
                ),
            },
            "optional": {
                "global_caption": (
                    "STRING",
                    {
                        "default": "",
                        "multiline": True,
                        "tooltip": "A caption of the whole image; its object nouns choose the semantic patch and "
                        "are the detector's queries. Empty: the detector looks for the 80 COCO classes.",
                    },
                ),
            },
        }

    def divide(
        self, image: list[Any], detector: list[Optional[ModelHandle]], detection_threshold: list[float],
        global_caption: Optional[list[str]] = None,
    ) -> tuple[list[PatchSet], list[Any]]:
        from patch_matters_core.stages.divide import divide

        pictures = images_to_pil(image)
        captions = _per_image(flatten(global_caption) or [""], len(pictures), "global captions")
        config = replace(PipelineConfig().divide, detection_threshold=float(first(detection_threshold)))
        config = PipelineConfig(divide=config).validate().divide

        start = time.perf_counter()
        logger.info("PatchDivide: dividing %d image(s).", len(pictures))
        progress = NodeProgress(len(pictures))
        patch_sets: list[PatchSet] = []
        previews: list[Any] = []
        with use_model(first(detector)) as detector_model:
            for picture, caption in zip(pictures, captions):
                patch_set = divide(picture, caption or "", detector_model, config, progress=progress)
                patch_sets.append(patch_set)
                previews.append(pil_to_image(draw_patches(picture, patch_set)))
        progress.finish()
        logger.info("PatchDivide: divided %d image(s) in %.1f s.", len(pictures), time.perf_counter() - start)
        return (patch_sets, previews)


class PatchMattersLocalDescribe:
    DESCRIPTION = (
        "Describes each whole image once, and each patch several times with sampling, using the VLM. "
        "The differences between the samples of a patch are what the semantic filter uses."
    )
    CATEGORY = CATEGORY
    FUNCTION = "describe"
    INPUT_IS_LIST = True
    RETURN_TYPES = ("PM_DESCRIPTIONS", "STRING")
    RETURN_NAMES = ("descriptions", "global_caption")
    OUTPUT_IS_LIST = (True, True)
    OUTPUT_TOOLTIPS = ("The global description and the patch samples of each image.",
                       "The VLM's description of each whole image.")

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        defaults = PipelineConfig().describe
        return {
            "required": {
                "image": ("IMAGE", {"tooltip": "The same images that the patches were made from."}),
                "patches": ("PM_PATCHES", {"tooltip": "The patches from PatchDivide."}),
                "vlm": ("PM_VLM", {"tooltip": "The VLM from the VLM loader."}),
                "samples": (
                    "INT",
                    {"default": defaults.num_samples, "min": 1, "max": 8,
                     "tooltip": "Descriptions per patch. The method uses 3; 1 skips the comparison between samples."},
                ),
                "temperature": (
                    "FLOAT",
                    {"default": defaults.sample_generation.temperature, "min": 0.0, "max": 2.0, "step": 0.05,
                     "tooltip": "Sampling temperature of the patch descriptions; the global description uses "
                     f"{defaults.global_generation.temperature}."},
                ),
                "seed": _seed_input(),
                "max_new_tokens": _max_tokens_input(defaults.sample_generation.max_new_tokens, "per description"),
                "prompt": (
                    "STRING",
                    {"default": defaults.patch_prompt, "multiline": True,
                     "tooltip": "The request sent with each patch crop. Empty: the default request."},
                ),
                "batch_size": (
                    "INT",
                    {"default": 1, "min": 0, "max": 64,
                     "tooltip": "Descriptions generated per model call (0: all of an image at once). Larger batches "
                     "are faster on a GPU, but the progress bar and cancel act once per batch."},
                ),
            }
        }

    def describe(
        self, image: list[Any], patches: list[PatchSet], vlm: list[ModelHandle], samples: list[int],
        temperature: list[float], seed: list[int], max_new_tokens: list[int], prompt: list[str],
        batch_size: list[int],
    ) -> tuple[list[DescribedImage], list[str]]:
        from patch_matters_core.stages.describe import describe

        vlm_handle = first(vlm)
        pairs = pair_up(images_to_pil(image), flatten(patches), "patch sets")
        config = PipelineConfig(
            describe=_describe_config(
                PipelineConfig().describe, int(first(samples)), float(first(temperature)), str(first(prompt) or ""),
                int(first(max_new_tokens)), int(first(batch_size)),
            ),
            seed=int(first(seed)),
        ).validate()

        start = time.perf_counter()
        logger.info("LocalDescribe: describing %d image(s).", len(pairs))
        calls = sum(1 + config.describe.num_samples * _described_count(patch_set) for _, patch_set in pairs)
        progress = NodeProgress(calls)
        described: list[DescribedImage] = []
        with use_model(vlm_handle) as vlm_model:
            for picture, patch_set in pairs:
                descriptions = describe(picture, patch_set, vlm_model, config.describe, seed=config.seed,
                                        progress=progress)
                described.append(DescribedImage(picture, descriptions, vlm_handle))
        progress.finish()
        logger.info("LocalDescribe: described %d image(s) in %.1f s.", len(pairs), time.perf_counter() - start)
        return (described, [item.descriptions.global_description for item in described])


class PatchMattersSemanticFilter:
    DESCRIPTION = (
        "Sorts the samples of each patch into consistent, contradictory and unique statements, and "
        "keeps the consistent ones and those the image-text matching model confirms on the patch. "
        "The report lists every kept and dropped statement with its score."
    )
    CATEGORY = CATEGORY
    FUNCTION = "filter"
    INPUT_IS_LIST = True
    OUTPUT_NODE = True
    RETURN_TYPES = ("PM_FILTERED", "STRING")
    RETURN_NAMES = ("filtered", "report")
    OUTPUT_IS_LIST = (True, True)
    OUTPUT_TOOLTIPS = ("The reliable statements of each patch.", "A readable report of the filtering, per image.")

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        defaults = PipelineConfig().filter
        return {
            "required": {
                "descriptions": ("PM_DESCRIPTIONS", {"tooltip": "The descriptions from LocalDescribe."}),
                "scorer": ("PM_SCORER", {"tooltip": "The image-text matching model from the scorer loader (it may be 'none')."}),
                "threshold": (
                    "FLOAT",
                    {"default": -1.0, "min": -1.0, "max": 1.0, "step": 0.01,
                     "tooltip": "Image-text score above which a statement is kept. Below 0: the scorer's own "
                     "threshold (0.3 for BLIP ITM)."},
                ),
                "seed": _seed_input(),
                "max_new_tokens": _max_tokens_input(defaults.sorting_generation.max_new_tokens, "of the sorting reply"),
            },
            "optional": {
                "llm": ("PM_LLM", {"tooltip": "The text model that sorts the statements. Not connected: the VLM "
                                   "that wrote the descriptions does it in text-only mode."}),
            },
        }

    def filter(
        self, descriptions: list[DescribedImage], scorer: list[Optional[ModelHandle]], threshold: list[float],
        seed: list[int], max_new_tokens: list[int], llm: Optional[list[ModelHandle]] = None,
    ) -> dict[str, Any]:
        from patch_matters_core.stages.filter import filter_descriptions

        items = flatten(descriptions)
        if not items:
            raise ValueError("No descriptions arrived; connect the descriptions output of LocalDescribe.")
        chosen_threshold = float(first(threshold))
        base = PipelineConfig().filter
        filter_config = replace(
            base,
            threshold=None if chosen_threshold < 0 else chosen_threshold,
            sorting_generation=replace(base.sorting_generation, max_new_tokens=int(first(max_new_tokens))),
        )
        config = PipelineConfig(filter=filter_config, seed=int(first(seed))).validate()
        text_handle = _text_model_handle(first(llm) if llm else None, items[0].vlm, "SemanticFilter")

        start = time.perf_counter()
        logger.info("SemanticFilter: filtering the descriptions of %d image(s).", len(items))
        progress = NodeProgress(FILTER_CALLS_PER_IMAGE * len(items))
        results: list[FilteredImage] = []
        reports: list[str] = []
        with use_model(first(scorer)) as scorer_model, use_model(text_handle) as text_model:
            for item in items:
                filtered = filter_descriptions(item.image, item.descriptions, scorer_model, text_model,
                                               config.filter, seed=config.seed, progress=progress)
                results.append(FilteredImage(item.image, filtered, item.vlm))
                used_threshold = config.filter.threshold
                if used_threshold is None and scorer_model is not None:
                    used_threshold = float(scorer_model.default_threshold)
                reports.append(filter_report(filtered, used_threshold))
        progress.finish()
        logger.info("SemanticFilter: filtered %d image(s) in %.1f s.", len(items), time.perf_counter() - start)
        return {"ui": {"text": reports}, "result": (results, reports)}


class PatchMattersHierarchicalAggregate:
    DESCRIPTION = (
        "Merges the reliable statements level by level: one description per patch, then neighbouring "
        "patches that overlap, then everything into the global description. Shows the final caption."
    )
    CATEGORY = CATEGORY
    FUNCTION = "aggregate"
    INPUT_IS_LIST = True
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("caption",)
    OUTPUT_IS_LIST = (True,)
    OUTPUT_TOOLTIPS = ("The enhanced caption of each image.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        defaults = PipelineConfig().aggregate
        return {
            "required": {
                "filtered": ("PM_FILTERED", {"tooltip": "The filtered descriptions from SemanticFilter."}),
                "temperature": (
                    "FLOAT",
                    {"default": defaults.merge_generation.temperature, "min": 0.0, "max": 2.0, "step": 0.05,
                     "tooltip": "Sampling temperature of the merges."},
                ),
                "seed": _seed_input(),
                "max_new_tokens": _max_tokens_input(defaults.final_generation.max_new_tokens, "of each merged description"),
            },
            "optional": {
                "llm": ("PM_LLM", {"tooltip": "The text model that writes the merges. Not connected: the VLM that "
                                   "wrote the descriptions does it in text-only mode."}),
                "scorer": ("PM_SCORER", {"tooltip": "Scores the statements of two merged neighbouring patches. "
                                         "Not connected: they are kept unverified."}),
            },
        }

    def aggregate(
        self, filtered: list[FilteredImage], temperature: list[float], seed: list[int], max_new_tokens: list[int],
        llm: Optional[list[ModelHandle]] = None, scorer: Optional[list[Optional[ModelHandle]]] = None,
    ) -> dict[str, Any]:
        from patch_matters_core.stages.aggregate import aggregate

        items = flatten(filtered)
        if not items:
            raise ValueError("No filtered descriptions arrived; connect the filtered output of SemanticFilter.")
        base = PipelineConfig().aggregate
        settings_temperature = float(first(temperature))
        tokens = int(first(max_new_tokens))
        aggregate_config = replace(
            base,
            merge_generation=replace(base.merge_generation, temperature=settings_temperature, max_new_tokens=tokens),
            final_generation=replace(base.final_generation, temperature=settings_temperature, max_new_tokens=tokens),
        )
        # Two merged neighbours are sorted like the samples of one patch, with the same token limit.
        filter_config = replace(
            PipelineConfig().filter,
            sorting_generation=replace(PipelineConfig().filter.sorting_generation, max_new_tokens=tokens),
        )
        config = PipelineConfig(aggregate=aggregate_config, filter=filter_config, seed=int(first(seed))).validate()
        text_handle = _text_model_handle(first(llm) if llm else None, items[0].vlm, "HierarchicalAggregate")

        start = time.perf_counter()
        logger.info("HierarchicalAggregate: aggregating %d image(s).", len(items))
        progress = NodeProgress(AGGREGATE_CALLS_PER_IMAGE * len(items))
        captions: list[str] = []
        with use_model(first(scorer) if scorer else None) as scorer_model, use_model(text_handle) as text_model:
            for item in items:
                aggregation = aggregate(item.image, item.filtered, text_model, scorer_model, config.aggregate,
                                        config.filter, seed=config.seed, progress=progress)
                captions.append(aggregation.caption)
        progress.finish()
        logger.info("HierarchicalAggregate: wrote %d caption(s) in %.1f s.", len(captions), time.perf_counter() - start)
        return _captions_result(captions)


class PatchMattersCaption:
    DESCRIPTION = (
        "Runs the whole Patch Matters method on each image: global description, patches, sampled "
        "patch descriptions, semantic filtering and hierarchical aggregation. Returns the enhanced "
        "caption and the JSON trace of the run."
    )
    CATEGORY = CATEGORY
    FUNCTION = "caption"
    INPUT_IS_LIST = True
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING", "STRING")
    RETURN_NAMES = ("caption", "trace_json")
    OUTPUT_IS_LIST = (True, True)
    OUTPUT_TOOLTIPS = ("The enhanced caption of each image.",
                       "The trace of each run as JSON: patches, samples, statements, merges and fallbacks.")

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        defaults = PipelineConfig()
        return {
            "required": {
                "image": ("IMAGE", {"tooltip": "The image or image batch to caption."}),
                "vlm": ("PM_VLM", {"tooltip": "The VLM from the VLM loader."}),
                "samples": (
                    "INT",
                    {"default": defaults.describe.num_samples, "min": 1, "max": 8,
                     "tooltip": "Descriptions per patch. The method uses 3."},
                ),
                "seed": _seed_input(),
                "max_new_tokens": _max_tokens_input(defaults.describe.sample_generation.max_new_tokens,
                                                    "per generated text"),
                "batch_size": (
                    "INT",
                    {"default": 1, "min": 0, "max": 64,
                     "tooltip": "Patch descriptions generated per model call (0: all of an image at once). Larger "
                     "batches are faster on a GPU, but the progress bar and cancel act once per batch."},
                ),
            },
            "optional": {
                "llm": ("PM_LLM", {"tooltip": "The text model for sorting and merging. Not connected: the VLM does it "
                                   "in text-only mode."}),
                "detector": ("PM_DETECTOR", {"tooltip": "Not connected: plain quadrants and no semantic patch."}),
                "scorer": ("PM_SCORER", {"tooltip": "Not connected: unique statements are kept unverified."}),
                "global_caption": (
                    "STRING",
                    {"default": "", "multiline": True,
                     "tooltip": "A caption to enhance. Empty: the VLM writes the global description."},
                ),
            },
        }

    def caption(
        self, image: list[Any], vlm: list[ModelHandle], samples: list[int], seed: list[int],
        max_new_tokens: list[int], batch_size: list[int], llm: Optional[list[ModelHandle]] = None,
        detector: Optional[list[Optional[ModelHandle]]] = None, scorer: Optional[list[Optional[ModelHandle]]] = None,
        global_caption: Optional[list[str]] = None,
    ) -> dict[str, Any]:
        from patch_matters_core.pipeline import PatchMatters

        pictures = images_to_pil(image)
        captions_in = _per_image(flatten(global_caption) or [""], len(pictures), "global captions")
        config = _caption_config(int(first(samples)), int(first(seed)), int(first(max_new_tokens)),
                                 int(first(batch_size)))
        vlm_handle = first(vlm)
        llm_handle = first(llm) if llm else None
        if llm_handle is not None and llm_handle.vlm == vlm_handle:
            llm_handle = None  # "same as VLM": the pipeline then uses the VLM in text-only mode

        start = time.perf_counter()
        logger.info("PatchMattersCaption: captioning %d image(s).", len(pictures))
        per_image = 2 + 5 * config.describe.num_samples + FILTER_CALLS_PER_IMAGE + AGGREGATE_CALLS_PER_IMAGE
        progress = NodeProgress(per_image * len(pictures))
        captions: list[str] = []
        traces: list[str] = []
        with (
            use_model(vlm_handle) as vlm_model,
            use_model(llm_handle) as llm_model,
            use_model(first(detector) if detector else None) as detector_model,
            use_model(first(scorer) if scorer else None) as scorer_model,
        ):
            pipeline = PatchMatters(vlm_model, llm_model, detector_model, scorer_model, config)
            for picture, given_caption in zip(pictures, captions_in):
                trace = pipeline.run(picture, global_caption=given_caption or None, progress=progress)
                captions.append(trace.caption)
                traces.append(trace.to_json())
        progress.finish()
        logger.info("PatchMattersCaption: captioned %d image(s) in %.1f s.", len(pictures), time.perf_counter() - start)
        return _captions_result(captions, traces)


def _caption_config(samples: int, seed: int, max_new_tokens: int, batch_size: int) -> PipelineConfig:
    """Pipeline settings of the all-in-one node: the defaults with its widgets applied."""
    base = PipelineConfig()
    describe = replace(
        base.describe,
        num_samples=samples,
        batch_size=batch_size,
        global_generation=replace(base.describe.global_generation, max_new_tokens=max_new_tokens),
        sample_generation=replace(base.describe.sample_generation, max_new_tokens=max_new_tokens),
    )
    filter_config = replace(
        base.filter, sorting_generation=replace(base.filter.sorting_generation, max_new_tokens=max_new_tokens)
    )
    aggregate_config = replace(
        base.aggregate,
        merge_generation=replace(base.aggregate.merge_generation, max_new_tokens=max_new_tokens),
        final_generation=replace(base.aggregate.final_generation, max_new_tokens=max_new_tokens),
    )
    return PipelineConfig(
        divide=base.divide, describe=describe, filter=filter_config, aggregate=aggregate_config, seed=seed
    ).validate()


def _described_count(patch_set: PatchSet) -> int:
    return sum(1 for patch in patch_set.patches if patch.name != GLOBAL and patch.described)


def _per_image(values: list[Any], count: int, name: str) -> list[Any]:
    """Give each image its value: one value for all images, or exactly one per image."""
    if len(values) == 1:
        return values * count
    if len(values) != count:
        raise ValueError(f"{len(values)} {name} arrived for {count} image(s); give one for all images or one per image.")
    return values
