"""Model handles for the loader nodes, and loading them for the duration of one node.

ComfyUI caches every node output until its inputs change. A loaded model returned by a loader
node would therefore stay in memory for as long as the graph is open. The loader nodes return
a ``ModelHandle`` instead: a small frozen record of what to load and how. The node that needs
the model loads it through the core's model cache with ``use_model``, registers its torch
module with ComfyUI's memory manager, and releases it again at the end of the node unless the
handle has ``keep_loaded`` set.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import logging
import time
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

from patch_matters_core.errors import ModelLoadError

from . import comfy_bridge

logger = logging.getLogger(__name__)

VLM = "vlm"
LLM = "llm"
DETECTOR = "detector"
SCORER = "scorer"

DEVICE_CHOICES = ["auto", "cpu", "cuda", "mps"]
DTYPE_CHOICES = ["auto", "bfloat16", "float16", "float32"]
ATTENTION_CHOICES = ["auto", "sdpa", "eager", "flash_attention_2"]

# config.json "model_type" values of the detector and scorer families the core supports.
DETECTOR_MODEL_TYPES = {"owlv2", "owlvit", "grounding-dino", "mm-grounding-dino"}
SCORER_MODEL_TYPES = {"blip", "clip", "siglip", "siglip2"}

# Combo entry shown when no model folder of a kind exists. Choosing it with an empty hub id
# field raises an error that names the folders to put models in.
NO_MODEL_FOUND = "(no model found: fill in hub id or path)"
SAME_AS_VLM = "same as VLM"
NONE_CHOICE = "none"


@dataclass(frozen=True)
class ModelHandle:
    """Selection of a loader node: the model source, where it runs, and whether it stays loaded.

    ``source`` is a model folder, a ``.gguf`` file or a Hugging Face hub id. For an LLM handle
    with ``vlm`` set, the text steps run on that VLM in text-only mode.
    """

    role: str
    source: str
    device: str = "auto"
    dtype: str = "auto"
    attn_implementation: Optional[str] = None
    keep_loaded: bool = False
    vlm: Optional["ModelHandle"] = None

    def describe(self) -> str:
        if self.vlm is not None:
            return f"{self.role} (the VLM {self.vlm.source}, text only)"
        return f"{self.role} {self.source}"


# ---------------------------------------------------------------------------------------------
# Model choices for the loader combos


def _model_type(folder: Path) -> Optional[str]:
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    return model_type if isinstance(model_type, str) else None


def _scan_folder(root: Path) -> list[tuple[str, Path, Optional[str]]]:
    """List (name relative to root, path, model_type or "gguf") of models at depth 1 and 2.

    Depth 2 covers the ``owner/name`` layout that ``huggingface-cli download`` users often keep.
    """
    found: list[tuple[str, Path, Optional[str]]] = []
    if not root.is_dir():
        return found

    for entry in sorted(root.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_file() and entry.suffix.lower() == ".gguf":
            found.append((entry.name, entry, "gguf"))
            continue
        if not entry.is_dir():
            continue
        if (entry / "config.json").is_file():
            found.append((entry.name, entry, _model_type(entry)))
            continue
        for child in sorted(entry.iterdir()):
            if child.name.startswith("."):
                continue
            if child.is_dir() and (child / "config.json").is_file():
                found.append((f"{entry.name}/{child.name}", child, _model_type(child)))
            elif child.is_file() and child.suffix.lower() == ".gguf":
                found.append((f"{entry.name}/{child.name}", child, "gguf"))
    return found


def scan_models() -> dict[str, tuple[Path, Optional[str]]]:
    """Map each model name found in the configured model folders to (path, model_type).

    The first folder in ComfyUI's order wins when two folders hold the same name.
    """
    models: dict[str, tuple[Path, Optional[str]]] = {}
    for folder in comfy_bridge.model_folders():
        for name, path, model_type in _scan_folder(Path(folder)):
            models.setdefault(name, (path, model_type))
    return models


def model_choices(role: str) -> list[str]:
    """Names of the local models that fit ``role``, sorted, for a loader combo."""
    names = []
    for name, (_path, model_type) in scan_models().items():
        if role == DETECTOR and model_type in DETECTOR_MODEL_TYPES:
            names.append(name)
        elif role == SCORER and model_type in SCORER_MODEL_TYPES:
            names.append(name)
        elif role == VLM and model_type not in DETECTOR_MODEL_TYPES | SCORER_MODEL_TYPES | {"gguf"}:
            names.append(name)
        elif role == LLM and model_type not in DETECTOR_MODEL_TYPES | SCORER_MODEL_TYPES:
            names.append(name)
    return sorted(names, key=str.lower)


def resolve_choice(role: str, choice: str, hub_id_or_path: str) -> str:
    """Return the model source of a loader: the free-text field when filled, else the combo's path."""
    text = (hub_id_or_path or "").strip()
    if text:
        return text

    if choice == NO_MODEL_FOUND or not choice:
        folders = ", ".join(comfy_bridge.model_folders()) or "models/LLM"
        raise ModelLoadError(
            f"No {role} model selected: no model folder was found in {folders}. Put a model folder "
            "(with config.json) there, or fill in the hub id or path field."
        )

    found = scan_models().get(choice)
    if found is None:
        raise ModelLoadError(
            f"{role} model '{choice}' was not found in the model folders "
            f"({', '.join(comfy_bridge.model_folders())}). Refresh the page to update the list."
        )
    return str(found[0])


def attention_choice(requested: str) -> Optional[str]:
    """Return the attn_implementation to pass to transformers, or None for its default.

    flash_attention_2 needs the flash-attn package, and without it this falls back to sdpa.
    """
    if requested in ("", "auto"):
        return None
    if requested == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        logger.warning(
            "Attention implementation flash_attention_2 needs the flash-attn package, which is not "
            "installed; using sdpa instead. Install it with: pip install flash-attn"
        )
        return "sdpa"
    return requested


# ---------------------------------------------------------------------------------------------
# Loading and releasing


def _load_core_model(handle: ModelHandle, device: str, dtype: str) -> Any:
    """Load (or take from the core's cache) the model that ``handle`` names."""
    if handle.role == VLM or handle.vlm is not None:
        from patch_matters_core.models.vlm import load_vlm

        vlm_handle = handle.vlm or handle
        return load_vlm(
            vlm_handle.source, device=device, dtype=dtype, attn_implementation=vlm_handle.attn_implementation
        )
    if handle.role == LLM:
        from patch_matters_core.models.llm import load_llm

        return load_llm(handle.source, device=device, dtype=dtype)
    if handle.role == DETECTOR:
        from patch_matters_core.models.detector import load_detector

        return load_detector(handle.source, device=device, dtype=dtype)
    if handle.role == SCORER:
        from patch_matters_core.models.scorer import load_scorer

        return load_scorer(handle.source, device=device, dtype=dtype)
    raise ValueError(f"Unknown model role {handle.role!r}; expected vlm, llm, detector or scorer.")


def _torch_module(model: Any) -> Optional[Any]:
    """Return the torch module of a core model object (its ``model`` attribute), if it has one."""
    import torch

    module = getattr(model, "model", None)
    return module if isinstance(module, torch.nn.Module) else None


class _Registration:
    """A torch module registered with ComfyUI's memory manager through a ModelPatcher."""

    def __init__(self, module: Any, load_device: Any, offload_device: Any) -> None:
        import torch

        class ManagedModule(torch.nn.Module):
            """Container that gives ComfyUI a writable ``device`` attribute.

            transformers models expose ``device`` as a read-only property, and ModelPatcher
            assigns it, so the model is wrapped instead of patched.
            """

            def __init__(self, inner: torch.nn.Module, device: Any) -> None:
                super().__init__()
                self.inner = inner
                self.device = device

        first_parameter = next(module.parameters(), None)
        current_device = first_parameter.device if first_parameter is not None else offload_device
        self.module = module
        self.wrapper = ManagedModule(module, current_device)
        self.patcher = comfy_bridge.model_patcher.ModelPatcher(
            self.wrapper, load_device=load_device, offload_device=offload_device
        )


# Registrations of loaded torch modules, by id() of the module. A kept-loaded model keeps its
# registration, so ComfyUI recognises it on the next run and can move it between devices.
_registrations: dict[int, _Registration] = {}


def _register(model: Any, load_device: Any, offload_device: Any) -> Optional[_Registration]:
    module = _torch_module(model)
    if module is None:
        return None

    registration = _registrations.get(id(module))
    if registration is None or registration.module is not module:
        registration = _Registration(module, load_device, offload_device)
        _registrations[id(module)] = registration

    comfy_bridge.model_management.load_models_gpu([registration.patcher])
    return registration


def _unregister(model: Any) -> None:
    """Move the model to its offload device through ComfyUI and forget its registration."""
    module = _torch_module(model)
    if module is None:
        return
    registration = _registrations.pop(id(module), None)
    if registration is None:
        return

    loaded_models = comfy_bridge.model_management.current_loaded_models
    for index, loaded in enumerate(loaded_models):
        if loaded.model is registration.patcher:
            loaded.model_unload()
            loaded_models.pop(index)
            break


# Weak references to the torch modules of released models. A live one means that something
# still references a released model's weights.
_released_modules: list[weakref.ref] = []


def release_model(model: Any, handle: ModelHandle) -> None:
    """Free one model now: out of ComfyUI's memory manager, out of the core cache, weights dropped."""
    from patch_matters_core.models import loading

    module = _torch_module(model)
    if module is not None:
        _released_modules.append(weakref.ref(module))
        del module

    if comfy_bridge.IN_COMFYUI:
        _unregister(model)
    loading.discard(model)
    release = getattr(model, "release", None)
    if callable(release):
        release()

    gc.collect()
    if comfy_bridge.model_management is not None:
        comfy_bridge.model_management.soft_empty_cache()
    logger.info("Released %s (keep loaded is off).", handle.describe())


@contextmanager
def use_model(handle: Optional[ModelHandle]) -> Iterator[Any]:
    """Load the model of ``handle`` for the body of the ``with`` block; None yields None.

    Inside ComfyUI the model is loaded on ComfyUI's offload device, and ComfyUI's memory
    manager moves it to the load device, so it can push the model out again when a later node
    (a sampler, say) needs the memory. The model is released on exit, also after an error or a
    cancel, unless the handle has ``keep_loaded`` set.
    """
    if handle is None:
        yield None
        return

    start = time.perf_counter()
    logger.info("Loading %s on %s (%s).", handle.describe(), handle.device, handle.dtype)
    if comfy_bridge.IN_COMFYUI:
        load_device, offload_device = comfy_bridge.comfy_devices(handle.device)
        dtype = comfy_bridge.comfy_dtype(load_device) if handle.dtype == "auto" else handle.dtype
        model = _load_core_model(handle, str(offload_device), dtype)
        _register(model, load_device, offload_device)
    else:
        model = _load_core_model(handle, handle.device, handle.dtype)
    logger.info("Loaded %s in %.1f s.", handle.describe(), time.perf_counter() - start)

    try:
        yield model
    finally:
        if not handle.keep_loaded:
            release_model(model, handle)



def memory_report() -> dict[str, Any]:
    """Count the models this pack keeps: cached by role, registered with ComfyUI, released but alive."""
    from patch_matters_core.models import loading

    gc.collect()
    _released_modules[:] = [ref for ref in _released_modules if ref() is not None]
    return {
        "cached": {role: loading.cached_count(role) for role in (VLM, LLM, DETECTOR, SCORER)},
        "registered_with_comfyui": len(_registrations),
        "released_but_alive": len(_released_modules),
    }
