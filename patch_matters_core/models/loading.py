"""Model source resolution, device and dtype choice, and the per-process model cache.

A model is named by a *spec*: a local folder with a ``config.json``, a ``.gguf`` file, or a
Hugging Face hub id such as ``owner/name``. Nothing here downloads on import and torch is
imported inside the functions that need it, so importing this module allocates no GPU memory.
"""

from __future__ import annotations

import gc
import importlib.util
import logging
import os
import re
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

from ..errors import ConfigError, MissingDependencyError, ModelLoadError

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Hub ids are "name" (old unscoped models such as "gpt2") or "owner/name". Both parts use
# letters, digits, "-", "_" and ".", and the hub limits a repository id to 96 characters.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*(/[A-Za-z0-9][A-Za-z0-9_.\-]*)?$")
_HUB_ID_MAX_LENGTH = 96
# "C:\models", "C:/models" and "\\server\share" are Windows paths on any operating system.
_WINDOWS_PATH = re.compile(r"^([A-Za-z]:[\\/]|\\\\)")

_DTYPE_NAMES = {
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
}


@dataclass(frozen=True)
class ModelSource:
    """Resolved location of a model: a local folder (with an optional GGUF file in it) or a hub id."""

    spec: str
    path: Optional[Path]
    hub_id: Optional[str]
    gguf_file: Optional[str] = None

    @property
    def is_local(self) -> bool:
        return self.path is not None

    @property
    def location(self) -> str:
        """The local file or folder, or the hub id, as shown in messages and model info."""
        if self.path is None:
            return self.hub_id or self.spec
        if self.gguf_file:
            return str(self.path / self.gguf_file)
        return str(self.path)


def looks_like_local_path(spec: str) -> bool:
    """Tell whether ``spec`` is written as a file system path rather than as a hub id.

    Absolute paths, paths starting with ``~``, ``.`` or a Windows drive, paths with a backslash
    or more than one ``/``, and names ending in ``.gguf`` count as local.
    """
    text = spec.strip()
    if text.startswith(("~", "./", "../", ".\\", "..\\")) or text in (".", ".."):
        return True
    if os.path.isabs(text) or _WINDOWS_PATH.match(text):
        return True
    if "\\" in text or text.count("/") > 1:
        return True
    return text.lower().endswith(".gguf")


def looks_like_hub_id(spec: str) -> bool:
    """Tell whether ``spec`` has the form of a Hugging Face hub id (``name`` or ``owner/name``)."""
    text = spec.strip()
    if len(text) > _HUB_ID_MAX_LENGTH or ".." in text or "--" in text:
        return False
    return bool(_HUB_ID.match(text))


def resolve_source(spec: str, role: str) -> ModelSource:
    """Resolve a model spec to a local folder, a GGUF file in a folder, or a hub id.

    ``role`` ("vlm", "llm", "detector" or "scorer") only appears in error messages. An existing
    folder must contain ``config.json`` or exactly one ``.gguf`` file. A spec that is written as
    a path but does not exist raises ModelLoadError naming the path.
    """
    text = str(spec).strip() if spec is not None else ""
    if not text:
        raise ModelLoadError(
            f"No {role} model given: pass a local model folder, a .gguf file or a Hugging Face hub id."
        )

    path = Path(os.path.expanduser(text))
    if path.exists():
        return _resolve_existing_path(text, path.resolve(), role)

    if looks_like_local_path(text):
        raise ModelLoadError(
            f"{role} model path '{text}' does not exist (looked at {path.absolute()}). "
            "Check the path, or pass a Hugging Face hub id such as owner/name."
        )
    if looks_like_hub_id(text):
        return ModelSource(spec=text, path=None, hub_id=text)
    raise ModelLoadError(
        f"{role} model '{text}' is neither an existing file or folder nor a Hugging Face hub id "
        "(owner/name). Pass the path of a model folder, of a .gguf file, or a hub id."
    )


def _resolve_existing_path(spec: str, path: Path, role: str) -> ModelSource:
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return ModelSource(spec=spec, path=path.parent, hub_id=None, gguf_file=path.name)
        # A file inside a model folder (config.json, model.safetensors) names that folder.
        if (path.parent / "config.json").is_file():
            return ModelSource(spec=spec, path=path.parent, hub_id=None)
        raise ModelLoadError(
            f"{role} model '{spec}' is a file but neither a .gguf file nor part of a model folder "
            "with config.json. Pass the model folder or the .gguf file."
        )

    if (path / "config.json").is_file():
        return ModelSource(spec=spec, path=path, hub_id=None)

    gguf_files = sorted(p.name for p in path.glob("*.gguf"))
    if len(gguf_files) == 1:
        return ModelSource(spec=spec, path=path, hub_id=None, gguf_file=gguf_files[0])
    if len(gguf_files) > 1:
        raise ModelLoadError(
            f"{role} model folder '{spec}' contains several GGUF files ({', '.join(gguf_files)}). "
            "Pass the path of the one .gguf file to use."
        )
    raise ModelLoadError(
        f"{role} model folder '{spec}' has no config.json and no .gguf file, so it is not a model folder. "
        "Pass the folder that contains config.json (as saved by save_pretrained or "
        "`huggingface-cli download`), or a .gguf file."
    )


def from_pretrained(loader: Any, source: ModelSource, role: str, **kwargs: Any) -> Any:
    """Call ``loader.from_pretrained`` on the source and turn loading failures into ModelLoadError.

    ``loader`` is any class with ``from_pretrained`` (AutoTokenizer, AutoModelForCausalLM, ...).
    A GGUF source passes ``gguf_file``. A hub id that is neither in the local Hugging Face cache
    nor reachable raises ModelLoadError with the steps to copy the model here. ImportError
    raised by transformers for a missing optional package passes through unchanged, so callers
    can fall back (for example to a processor built without torchvision).
    """
    if source.gguf_file:
        if importlib.util.find_spec("gguf") is None:
            raise MissingDependencyError(
                f"{role} model '{source.spec}' is a GGUF file, and reading GGUF files needs the "
                "gguf package: pip install gguf"
            )
        kwargs["gguf_file"] = source.gguf_file

    target = str(source.path) if source.path is not None else source.hub_id
    loader_name = getattr(loader, "__name__", type(loader).__name__)
    try:
        return loader.from_pretrained(target, **kwargs)
    except ImportError:
        raise
    except OSError as error:
        if source.path is None:
            raise ModelLoadError(_hub_failure_message(source, role, error)) from error
        raise ModelLoadError(
            f"{role} model '{source.spec}' could not be loaded with {loader_name} from "
            f"{source.location}: {error} Check that the folder is complete (config.json, weights, "
            "tokenizer or processor files) or download it again."
        ) from error
    except (ValueError, KeyError) as error:
        raise ModelLoadError(
            f"{role} model '{source.spec}' could not be loaded with {loader_name}: {error} "
            "The model type may need a newer transformers (pip install -U transformers), or the "
            "model is of a kind this role does not support."
        ) from error


def _hub_failure_message(source: ModelSource, role: str, error: OSError) -> str:
    hub_id = source.hub_id
    error_name = type(error).__name__
    if error_name == "GatedRepoError":
        return (
            f"{role} model '{hub_id}' is a gated repository on the Hugging Face hub. Accept its "
            "terms on the model page, then log in with `huggingface-cli login`, or download it "
            "elsewhere and pass the folder path."
        )
    if error_name in ("RepositoryNotFoundError", "RevisionNotFoundError"):
        return (
            f"{role} model '{hub_id}' was not found on the Hugging Face hub. Check the id, "
            "or pass the path of a local model folder."
        )

    reason = "offline mode is on (HF_HUB_OFFLINE)" if _hub_offline() else "the hub cannot be reached"
    local_hint = ""
    if "/" not in hub_id:
        local_hint = f" If '{hub_id}' is meant as a local folder, it was not found at {Path(hub_id).absolute()}."
    return (
        f"{role} model '{hub_id}' is not on this machine (not in the Hugging Face cache) and "
        f"{reason}. Download it on a machine with internet access with "
        f"`huggingface-cli download {hub_id} --local-dir DIR`, copy DIR here and pass the "
        "folder path instead of the id. For a GGUF model, pass the path of the .gguf file."
        f"{local_hint}"
    )


def _hub_offline() -> bool:
    try:
        from huggingface_hub import is_offline_mode
    except ImportError:
        return any(
            os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")
            for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
        )
    return bool(is_offline_mode())


def resolve_device(device: str) -> str:
    """Turn "auto", "cpu", "cuda", "cuda:N" or "mps" into a concrete device string.

    "auto" picks CUDA when available, then MPS, then the CPU. Asking for a device that this
    machine lacks raises ConfigError.
    """
    import torch

    name = str(device).strip().lower() if device is not None else "auto"
    if name in ("", "auto"):
        if torch.cuda.is_available():
            return "cuda"
        if _mps_available():
            return "mps"
        return "cpu"

    if name == "cpu":
        return "cpu"

    if name == "mps":
        if not _mps_available():
            raise ConfigError("device 'mps' was requested but Apple MPS is not available; use 'cpu' or 'auto'.")
        return "mps"

    match = re.fullmatch(r"cuda(?::(\d+))?", name)
    if match:
        if not torch.cuda.is_available():
            raise ConfigError(
                f"device '{device}' was requested but CUDA is not available (torch {torch.__version__}); "
                "use 'cpu' or 'auto', or install a CUDA build of torch."
            )
        index = match.group(1)
        if index is not None and int(index) >= torch.cuda.device_count():
            raise ConfigError(
                f"device '{device}' does not exist: this machine has {torch.cuda.device_count()} CUDA "
                f"device(s), numbered from 0."
            )
        return name

    raise ConfigError(f"device '{device}' is invalid; use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'.")


def _mps_available() -> bool:
    import torch

    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_dtype(dtype: Any, device: str) -> Any:
    """Turn "auto", "float32", "bfloat16" or "float16" (or a torch.dtype) into a torch.dtype.

    "auto" is bfloat16 on CUDA devices that support it, float16 on other CUDA devices and
    float32 on the CPU and MPS.
    """
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype

    name = str(dtype).strip().lower() if dtype is not None else "auto"
    name = name.removeprefix("torch.")
    if name in ("", "auto"):
        if str(device).startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32

    if name not in _DTYPE_NAMES:
        raise ConfigError(f"dtype '{dtype}' is invalid; use 'auto', 'float32', 'bfloat16' or 'float16'.")
    resolved = getattr(torch, _DTYPE_NAMES[name])
    if resolved is torch.float16 and str(device) == "cpu":
        logger.warning("dtype float16 on the CPU is slow and some operations lack float16 kernels; float32 or bfloat16 is safer.")
    return resolved


def dtype_name(dtype: Any) -> str:
    """Short name of a torch.dtype ("float32"), as stored in ModelInfo."""
    return str(dtype).removeprefix("torch.")


_cache: dict[tuple[str, str, str, str], Any] = {}
_key_locks: dict[tuple[str, str, str, str], threading.Lock] = {}
_cache_lock = threading.Lock()


def _cache_key(role: str, source: ModelSource, device: str, dtype: Any) -> tuple[str, str, str, str]:
    # The resolved location makes "~/m" and "/home/user/m" one entry.
    return (role, source.location, str(device), dtype_name(dtype))


def cached(role: str, source: ModelSource, device: str, dtype: Any, factory: Callable[[], T]) -> T:
    """Return the model cached under (role, source, device, dtype), building it with ``factory`` once.

    Two threads asking for the same model wait for one load, and different models load in
    parallel. A failed ``factory`` caches nothing.
    """
    key = _cache_key(role, source, device, dtype)
    with _cache_lock:
        if key in _cache:
            logger.debug("Model cache hit for %s model %s on %s (%s).", role, source.location, key[2], key[3])
            return _cache[key]
        key_lock = _key_locks.setdefault(key, threading.Lock())

    with key_lock:
        with _cache_lock:
            if key in _cache:
                return _cache[key]
        model = factory()
        with _cache_lock:
            _cache[key] = model
        return model


def load_cached(
    spec: str, role: str, device: str, dtype: Any, build: Callable[[ModelSource, str, Any], T]
) -> T:
    """Resolve the model spec, device and dtype, then return the cached model or ``build(source, device, dtype)``."""
    source = resolve_source(spec, role)
    resolved_device = resolve_device(device)
    resolved_dtype = resolve_dtype(dtype, resolved_device)

    def build_resolved() -> T:
        return build(source, resolved_device, resolved_dtype)

    return cached(role, source, resolved_device, resolved_dtype, build_resolved)


def load_processor(source: ModelSource, role: str) -> Any:
    """Load the source's processor with AutoProcessor.

    Raises MissingDependencyError, naming the model, when the processor needs a package that
    is not installed.
    """
    from transformers import AutoProcessor

    try:
        return from_pretrained(AutoProcessor, source, role)
    except ImportError as error:
        reason = str(error).strip().rstrip(".")
        if "pip install" not in reason:
            reason += ". Install that package with pip and load the model again"
        raise MissingDependencyError(
            f"The processor of {role} model '{source.spec}' needs a package that is not installed: {reason}."
        ) from error


def discard(model: Any) -> bool:
    """Remove ``model`` from the cache without releasing it; return whether it was cached."""
    with _cache_lock:
        keys = [key for key, value in _cache.items() if value is model]
        for key in keys:
            del _cache[key]
    return bool(keys)


def cached_count(role: Optional[str] = None) -> int:
    """Number of cached models, of all roles or of one."""
    with _cache_lock:
        return sum(1 for key in _cache if role is None or key[0] == role)


def release_models(role: Optional[str] = None) -> int:
    """Drop cached models (all, or those of one role) and free their memory; return how many.

    A model object with a ``release()`` method gets it called, so its weights are freed even
    where a caller still keeps a reference to the object. That object then raises on use.
    After dropping any model, this runs the garbage collector and empties the CUDA cache when
    CUDA is initialised.
    """
    with _cache_lock:
        keys = [key for key in _cache if role is None or key[0] == role]
        released = [_cache.pop(key) for key in keys]

    count = len(released)
    _call_release(released)
    # The list held the last references of the cache, so clearing it lets gc free the weights.
    released.clear()
    if not count:
        return 0

    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()

    logger.info("Released %d cached model(s) of role %s.", count, role or "any")
    return count


def _call_release(models: list[Any]) -> None:
    for model in models:
        release = getattr(model, "release", None)
        if callable(release):
            release()
