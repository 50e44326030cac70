"""Loader nodes: each returns a ModelHandle (what to load), never a loaded model.

ComfyUI keeps node outputs cached, so a loaded model as output could never be freed. The
nodes that run a model load it from the handle and release it when they finish, unless
"keep loaded" is on.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

from .models import (
    ATTENTION_CHOICES,
    DETECTOR,
    DEVICE_CHOICES,
    DTYPE_CHOICES,
    LLM,
    NO_MODEL_FOUND,
    NONE_CHOICE,
    SAME_AS_VLM,
    SCORER,
    VLM,
    ModelHandle,
    attention_choice,
    model_choices,
    resolve_choice,
)

logger = logging.getLogger(__name__)

CATEGORY = "Patch Matters/loaders"

HUB_ID_TOOLTIP = (
    "A Hugging Face hub id (owner/name) or the path of a model folder or .gguf file. When filled "
    "in, it is used instead of the list above. Hub ids load only from the local Hugging Face "
    "cache when HF_HUB_OFFLINE is set."
)
DEVICE_TOOLTIP = (
    "Where the model runs. auto lets ComfyUI choose (its GPU, or the CPU with --cpu) and lets "
    "ComfyUI's memory manager move the model off the GPU when another model needs the memory."
)
DTYPE_TOOLTIP = (
    "Weight precision. auto takes bfloat16 or float16 on GPUs that support them and float32 on "
    "the CPU."
)
KEEP_LOADED_TOOLTIP = (
    "On: the model stays in memory after the node that used it, so the next run starts at once. "
    "Off: the model is loaded for each run and freed from RAM and VRAM when the node finishes."
)


def _with_placeholder(names: list[str]) -> list[str]:
    return names if names else [NO_MODEL_FOUND]


def _common_inputs() -> dict[str, Any]:
    return {
        "hub_id_or_path": ("STRING", {"default": "", "multiline": False, "tooltip": HUB_ID_TOOLTIP}),
        "device": (DEVICE_CHOICES, {"default": "auto", "tooltip": DEVICE_TOOLTIP}),
        "dtype": (DTYPE_CHOICES, {"default": "auto", "tooltip": DTYPE_TOOLTIP}),
        "keep_loaded": ("BOOLEAN", {"default": False, "tooltip": KEEP_LOADED_TOOLTIP}),
    }


class PatchMattersVLMLoader:
    DESCRIPTION = (
        "Selects the vision-language model that describes the whole image and each patch. "
        "Lists the model folders in ComfyUI's models/LLM and models/VLM folders (and those set in "
        "extra_model_paths.yaml). Loading happens in the node that uses the model."
    )
    CATEGORY = CATEGORY
    FUNCTION = "select"
    RETURN_TYPES = ("PM_VLM",)
    RETURN_NAMES = ("vlm",)
    OUTPUT_TOOLTIPS = ("The selected VLM, loaded by the node that uses it.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        common = _common_inputs()
        return {
            "required": {
                "model": (
                    _with_placeholder(model_choices(VLM)),
                    {"tooltip": "A chat VLM folder (Qwen2.5-VL, LLaVA, SmolVLM, ...) from models/LLM or models/VLM."},
                ),
                "hub_id_or_path": common["hub_id_or_path"],
                "device": common["device"],
                "dtype": common["dtype"],
                "attention": (
                    ATTENTION_CHOICES,
                    {
                        "default": "auto",
                        "tooltip": "Attention implementation. auto is the transformers default. "
                        "flash_attention_2 needs the flash-attn package and falls back to sdpa without it.",
                    },
                ),
                "keep_loaded": common["keep_loaded"],
            }
        }

    def select(
        self, model: str, hub_id_or_path: str, device: str, dtype: str, attention: str, keep_loaded: bool
    ) -> tuple[ModelHandle]:
        source = resolve_choice(VLM, model, hub_id_or_path)
        handle = ModelHandle(
            role=VLM,
            source=source,
            device=device,
            dtype=dtype,
            attn_implementation=attention_choice(attention),
            keep_loaded=bool(keep_loaded),
        )
        return (handle,)


class PatchMattersLLMLoader:
    DESCRIPTION = (
        "Selects the text model for sorting statements and merging descriptions: a model folder, "
        "a .gguf file, or the VLM itself in text-only mode (connect the VLM and choose "
        f"'{SAME_AS_VLM}'), which needs no extra memory."
    )
    CATEGORY = CATEGORY
    FUNCTION = "select"
    RETURN_TYPES = ("PM_LLM",)
    RETURN_NAMES = ("llm",)
    OUTPUT_TOOLTIPS = ("The selected text model, loaded by the node that uses it.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        common = _common_inputs()
        return {
            "required": {
                "model": (
                    [SAME_AS_VLM] + model_choices(LLM),
                    {
                        "default": SAME_AS_VLM,
                        "tooltip": "A text or chat model folder, or a .gguf file, from models/LLM or models/VLM; "
                        f"'{SAME_AS_VLM}' uses the connected VLM for the text steps.",
                    },
                ),
                "hub_id_or_path": common["hub_id_or_path"],
                "device": common["device"],
                "dtype": common["dtype"],
                "keep_loaded": common["keep_loaded"],
            },
            "optional": {
                "vlm": ("PM_VLM", {"tooltip": f"The VLM to use for the text steps when the model is '{SAME_AS_VLM}'."}),
            },
        }

    def select(
        self,
        model: str,
        hub_id_or_path: str,
        device: str,
        dtype: str,
        keep_loaded: bool,
        vlm: Optional[ModelHandle] = None,
    ) -> tuple[ModelHandle]:
        if model == SAME_AS_VLM and not (hub_id_or_path or "").strip():
            if vlm is None:
                raise ValueError(
                    f"The LLM loader is set to '{SAME_AS_VLM}' but no VLM is connected to its vlm input. "
                    "Connect the VLM loader, or choose a text model."
                )
            return (ModelHandle(role=LLM, source=vlm.source, device=vlm.device, dtype=vlm.dtype,
                                keep_loaded=vlm.keep_loaded, vlm=vlm),)

        source = resolve_choice(LLM, model, hub_id_or_path)
        return (ModelHandle(role=LLM, source=source, device=device, dtype=dtype, keep_loaded=bool(keep_loaded)),)


class _OptionalModelLoader:
    """Shared code of the detector and scorer loaders, whose model may be "none"."""

    ROLE = ""
    FOLDER_HINT = ""
    NONE_MEANING = ""
    CATEGORY = CATEGORY
    FUNCTION = "select"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        common = _common_inputs()
        return {
            "required": {
                "model": (
                    [NONE_CHOICE] + model_choices(cls.ROLE),
                    {"default": NONE_CHOICE, "tooltip": f"{cls.FOLDER_HINT} '{NONE_CHOICE}': {cls.NONE_MEANING}"},
                ),
                "hub_id_or_path": common["hub_id_or_path"],
                "device": common["device"],
                "dtype": common["dtype"],
                "keep_loaded": common["keep_loaded"],
            }
        }

    def select(
        self, model: str, hub_id_or_path: str, device: str, dtype: str, keep_loaded: bool
    ) -> tuple[Optional[ModelHandle]]:
        if model == NONE_CHOICE and not (hub_id_or_path or "").strip():
            return (None,)
        source = resolve_choice(self.ROLE, model, hub_id_or_path)
        return (ModelHandle(role=self.ROLE, source=source, device=device, dtype=dtype, keep_loaded=bool(keep_loaded)),)


class PatchMattersDetectorLoader(_OptionalModelLoader):
    ROLE = DETECTOR
    FOLDER_HINT = "An open-vocabulary detector folder (OWLv2, OWL-ViT, Grounding DINO) from models/detection or models/LLM."
    NONE_MEANING = "no detector; the image is cut into plain quadrants and the semantic patch is skipped."
    DESCRIPTION = (
        "Selects the object detector that places the patches around objects, so that no object is "
        f"cut in half. '{NONE_CHOICE}' cuts the image into plain quadrants."
    )
    RETURN_TYPES = ("PM_DETECTOR",)
    RETURN_NAMES = ("detector",)
    OUTPUT_TOOLTIPS = ("The selected detector (or none), loaded by the node that uses it.",)


class PatchMattersScorerLoader(_OptionalModelLoader):
    ROLE = SCORER
    FOLDER_HINT = "An image-text matching model folder (BLIP ITM, CLIP, SigLIP) from models/itm or models/LLM."
    NONE_MEANING = "no scorer; statements found in only one sample are kept unverified."
    DESCRIPTION = (
        "Selects the image-text matching model that checks each statement against its patch. "
        "BLIP ITM (Salesforce/blip-itm-large-coco) matches the method's threshold of 0.3."
    )
    RETURN_TYPES = ("PM_SCORER",)
    RETURN_NAMES = ("scorer",)
    OUTPUT_TOOLTIPS = ("The selected scorer (or none), loaded by the node that uses it.",)
