"""Model source resolution, loading errors, device and dtype choice, and the model cache."""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from patch_matters_core.errors import ConfigError, MissingDependencyError, ModelLoadError
from patch_matters_core.models import loading
from patch_matters_core.models.loading import (
    ModelSource,
    cached,
    cached_count,
    discard,
    from_pretrained,
    looks_like_hub_id,
    looks_like_local_path,
    release_models,
    resolve_device,
    resolve_dtype,
    resolve_source,
)


@pytest.fixture(autouse=True)
def empty_cache():
    release_models()
    yield
    release_models()


@pytest.fixture
def hub_offline(monkeypatch):
    """Offline mode as HF_HUB_OFFLINE=1 sets it, also for a huggingface_hub imported earlier."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def make_model_folder(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}), encoding="utf-8")
    return folder


@pytest.mark.parametrize(
    "spec, local",
    [
        ("./models/llm", True),
        ("../llm", True),
        ("~/models/llm", True),
        ("/opt/models/llm", True),
        ("C:\\models\\llm", True),
        ("C:/models/llm", True),
        ("\\\\server\\share\\llm", True),
        ("models\\llm", True),
        ("models/llm/v2", True),
        ("SmolLM2.Q4_1.gguf", True),
        ("owner/name", False),
        ("gpt2", False),
    ],
)
def test_looks_like_local_path_table(spec: str, local: bool) -> None:
    assert looks_like_local_path(spec) is local


@pytest.mark.parametrize(
    "spec, hub",
    [
        ("HuggingFaceTB/SmolLM2-135M-Instruct", True),
        ("Qwen/Qwen2.5-VL-3B-Instruct", True),
        ("gpt2", True),
        ("owner/na me", False),
        ("owner/../name", False),
        ("owner--name/x", False),
        ("-owner/name", False),
        ("o/" + "n" * 100, False),
    ],
)
def test_looks_like_hub_id_table(spec: str, hub: bool) -> None:
    assert looks_like_hub_id(spec) is hub


def test_resolve_model_folder(tmp_path: Path) -> None:
    folder = make_model_folder(tmp_path / "llm")

    source = resolve_source(str(folder), "llm")

    assert source.path == folder.resolve()
    assert source.hub_id is None
    assert source.gguf_file is None
    assert source.location == str(folder.resolve())


def test_resolve_gguf_file(tmp_path: Path) -> None:
    gguf = tmp_path / "Model.Q4_1.gguf"
    gguf.write_bytes(b"GGUF")

    source = resolve_source(str(gguf), "llm")

    assert source.path == tmp_path.resolve()
    assert source.gguf_file == "Model.Q4_1.gguf"
    assert source.location == str(gguf.resolve())


def test_resolve_folder_with_one_gguf(tmp_path: Path) -> None:
    (tmp_path / "only.gguf").write_bytes(b"GGUF")

    source = resolve_source(str(tmp_path), "llm")

    assert source.gguf_file == "only.gguf"


def test_resolve_folder_with_two_gguf(tmp_path: Path) -> None:
    (tmp_path / "a.gguf").write_bytes(b"GGUF")
    (tmp_path / "b.gguf").write_bytes(b"GGUF")

    with pytest.raises(ModelLoadError) as raised:
        resolve_source(str(tmp_path), "llm")

    assert "a.gguf" in str(raised.value)
    assert "b.gguf" in str(raised.value)


def test_resolve_folder_without_config(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError) as raised:
        resolve_source(str(tmp_path), "scorer")

    message = str(raised.value)
    assert message.startswith("scorer model folder")
    assert "config.json" in message


def test_resolve_file_inside_model_folder(tmp_path: Path) -> None:
    folder = make_model_folder(tmp_path / "vlm")

    source = resolve_source(str(folder / "config.json"), "vlm")

    assert source.path == folder.resolve()
    assert source.gguf_file is None


def test_resolve_unrelated_file(tmp_path: Path) -> None:
    other = tmp_path / "notes.txt"
    other.write_text("x", encoding="utf-8")

    with pytest.raises(ModelLoadError, match="neither a .gguf file"):
        resolve_source(str(other), "llm")


def test_resolve_home_folder(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    folder = make_model_folder(tmp_path / "models" / "llm")

    source = resolve_source("~/models/llm", "llm")

    assert source.path == folder.resolve()
    assert source.spec == "~/models/llm"


def test_resolve_relative_folder(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    folder = make_model_folder(tmp_path / "owner" / "name")

    source = resolve_source("owner/name", "llm")

    # An existing folder wins over the hub id of the same spelling, as in transformers.
    assert source.path == folder.resolve()
    assert source.hub_id is None


@pytest.mark.parametrize("spec", ["owner/name", "gpt2", "  owner/name  "])
def test_resolve_hub_id(spec: str, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)

    source = resolve_source(spec, "detector")

    assert source.path is None
    assert source.hub_id == spec.strip()
    assert source.location == spec.strip()


@pytest.mark.parametrize(
    "spec",
    ["./missing-model", "/nonexistent/models/llm", "~/nonexistent-model-folder", "C:\\models\\llm", "missing.gguf"],
)
def test_resolve_missing_local_path(spec: str, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)

    with pytest.raises(ModelLoadError) as raised:
        resolve_source(spec, "llm")

    message = str(raised.value)
    assert spec in message
    assert "does not exist" in message


@pytest.mark.parametrize("spec", ["owner/na me", "a:b"])
def test_resolve_invalid_spec(spec: str, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)

    with pytest.raises(ModelLoadError, match="neither an existing file or folder nor a Hugging Face hub id"):
        resolve_source(spec, "llm")


@pytest.mark.parametrize("spec", ["", "   ", None])
def test_resolve_empty_spec(spec) -> None:
    with pytest.raises(ModelLoadError, match="No vlm model given"):
        resolve_source(spec, "vlm")


def test_offline_hub_id_error(hub_offline, tmp_path: Path, monkeypatch, caplog) -> None:
    from transformers import AutoConfig

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_TOKEN", "hf_secretvalue123")
    source = resolve_source("someone/not-downloaded-model", "llm")

    with caplog.at_level(logging.DEBUG), pytest.raises(ModelLoadError) as raised:
        from_pretrained(AutoConfig, source, "llm")

    message = str(raised.value)
    assert message.startswith("llm model 'someone/not-downloaded-model' is not on this machine")
    assert "HF_HUB_OFFLINE" in message
    assert "huggingface-cli download someone/not-downloaded-model --local-dir DIR" in message
    assert "pass the folder path" in message
    assert ".gguf" in message
    assert isinstance(raised.value.__cause__, OSError)
    assert "hf_secretvalue123" not in message
    assert "hf_secretvalue123" not in caplog.text


def test_offline_unscoped_id_mentions_folder(hub_offline, tmp_path: Path, monkeypatch) -> None:
    from transformers import AutoConfig

    monkeypatch.chdir(tmp_path)
    source = resolve_source("mymodel", "scorer")

    with pytest.raises(ModelLoadError) as raised:
        from_pretrained(AutoConfig, source, "scorer")

    assert str(tmp_path / "mymodel") in str(raised.value)


def test_gated_and_unknown_hub_errors() -> None:
    import httpx2
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    response = httpx2.Response(404, request=httpx2.Request("GET", "https://huggingface.co/owner/name"))
    source = ModelSource(spec="owner/name", path=None, hub_id="owner/name")

    class Loader:
        error: Exception

        @classmethod
        def from_pretrained(cls, target, **kwargs):
            raise cls.error

    Loader.error = GatedRepoError("gated", response=response)
    with pytest.raises(ModelLoadError, match="gated repository") as raised:
        from_pretrained(Loader, source, "vlm")
    assert "huggingface-cli login" in str(raised.value)

    Loader.error = RepositoryNotFoundError("missing", response=response)
    with pytest.raises(ModelLoadError, match="was not found on the Hugging Face hub"):
        from_pretrained(Loader, source, "vlm")


def test_local_folder_without_weights(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, LlamaConfig

    folder = tmp_path / "llm"
    LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=64).save_pretrained(folder)
    source = resolve_source(str(folder), "llm")

    with pytest.raises(ModelLoadError) as raised:
        from_pretrained(AutoModelForCausalLM, source, "llm")

    message = str(raised.value)
    assert str(folder.resolve()) in message
    assert "AutoModelForCausalLM" in message


def test_local_folder_unknown_model_type(tmp_path: Path) -> None:
    from transformers import AutoConfig

    folder = tmp_path / "future"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "model-from-the-future"}), encoding="utf-8")
    source = resolve_source(str(folder), "vlm")

    with pytest.raises(ModelLoadError, match="newer transformers"):
        from_pretrained(AutoConfig, source, "vlm")


def test_gguf_needs_gguf_package(tmp_path: Path, monkeypatch) -> None:
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    source = resolve_source(str(gguf), "llm")
    # A None entry in sys.modules makes the import system report the package as missing.
    monkeypatch.setitem(sys.modules, "gguf", None)

    class Loader:
        @classmethod
        def from_pretrained(cls, target, **kwargs):
            raise AssertionError("must not be called without the gguf package")

    with pytest.raises(MissingDependencyError, match="pip install gguf"):
        from_pretrained(Loader, source, "llm")


def test_gguf_file_passed_to_loader(tmp_path: Path) -> None:
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    source = resolve_source(str(gguf), "llm")
    calls = []

    class Loader:
        @classmethod
        def from_pretrained(cls, target, **kwargs):
            calls.append((target, kwargs))
            return "loaded"

    assert from_pretrained(Loader, source, "llm", dtype="x") == "loaded"
    assert calls == [(str(tmp_path.resolve()), {"gguf_file": "m.gguf", "dtype": "x"})]


def test_import_error_passes_through(tmp_path: Path) -> None:
    source = ModelSource(spec=str(tmp_path), path=tmp_path, hub_id=None)

    class Loader:
        @classmethod
        def from_pretrained(cls, target, **kwargs):
            raise ImportError("requires the Torchvision library")

    with pytest.raises(ImportError, match="Torchvision"):
        from_pretrained(Loader, source, "vlm")


@pytest.mark.parametrize(
    "reason, ending",
    [
        ("requires the scipy library", "Install that package with pip and load the model again."),
        (
            "requires the SentencePiece library. You can install it with: pip install sentencepiece",
            "pip install sentencepiece.",
        ),
    ],
    ids=["hint_added", "pip_command_kept"],
)
def test_processor_import_error_message(reason: str, ending: str, tmp_path: Path, monkeypatch) -> None:
    import transformers

    source = ModelSource(spec="my-detector", path=tmp_path, hub_id=None)

    def missing_package(target, **kwargs):
        raise ImportError(reason)

    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", missing_package)

    with pytest.raises(MissingDependencyError) as caught:
        loading.load_processor(source, "detector")
    message = str(caught.value)
    assert "detector model 'my-detector'" in message
    assert reason in message
    assert message.endswith(ending)
    assert message.count("pip") == 1


def test_resolve_device_values() -> None:
    assert resolve_device("cpu") == "cpu"
    assert resolve_device(" CPU ") == "cpu"
    expected_auto = "cpu"
    if torch.backends.mps.is_available():
        expected_auto = "mps"
    if torch.cuda.is_available():
        expected_auto = "cuda"
    assert resolve_device("auto") == expected_auto
    assert resolve_device("") == expected_auto


@pytest.mark.parametrize("device", ["tpu", "cuda:x", "gpu"])
def test_resolve_device_invalid(device: str) -> None:
    with pytest.raises(ConfigError, match="is invalid"):
        resolve_device(device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_resolve_device_cuda_missing(device: str) -> None:
    with pytest.raises(ConfigError, match="CUDA is not available"):
        resolve_device(device)


def test_resolve_device_cuda_index_out_of_range() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_device(f"cuda:{torch.cuda.device_count()}")


def test_resolve_dtype_values() -> None:
    assert resolve_dtype("auto", "cpu") is torch.float32
    assert resolve_dtype("auto", "mps") is torch.float32
    assert resolve_dtype("bf16", "cpu") is torch.bfloat16
    assert resolve_dtype("torch.bfloat16", "cpu") is torch.bfloat16
    assert resolve_dtype("float32", "cuda") is torch.float32
    assert resolve_dtype(torch.float16, "cpu") is torch.float16


def test_resolve_dtype_auto_on_cuda(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    assert resolve_dtype("auto", "cuda") is torch.bfloat16
    assert resolve_dtype("auto", "cuda:1") is torch.bfloat16

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)
    assert resolve_dtype("auto", "cuda") is torch.float16


def test_resolve_dtype_invalid() -> None:
    with pytest.raises(ConfigError, match="dtype 'int8' is invalid"):
        resolve_dtype("int8", "cpu")


def test_float16_on_cpu_warns(caplog) -> None:
    with caplog.at_level(logging.WARNING, logger=loading.__name__):
        assert resolve_dtype("fp16", "cpu") is torch.float16

    assert "float16 on the CPU" in caplog.text


class FakeModel:
    """Stand-in for a loaded model that records whether it was released."""

    def __init__(self) -> None:
        self.released = False

    def release(self) -> None:
        self.released = True


def test_cache_hit_and_miss(tmp_path: Path) -> None:
    source = resolve_source(str(make_model_folder(tmp_path / "m")), "llm")
    builds = []

    def factory():
        builds.append(1)
        return FakeModel()

    first = cached("llm", source, "cpu", torch.float32, factory)
    second = cached("llm", source, "cpu", torch.float32, factory)
    other_dtype = cached("llm", source, "cpu", torch.bfloat16, factory)
    other_role = cached("vlm", source, "cpu", torch.float32, factory)

    assert first is second
    assert other_dtype is not first
    assert other_role is not first
    assert len(builds) == 3
    assert cached_count() == 3
    assert cached_count("vlm") == 1


def test_cache_same_folder_spelled_differently(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    make_model_folder(tmp_path / "m")
    by_home = resolve_source("~/m", "llm")
    by_absolute = resolve_source(str(tmp_path / "m"), "llm")

    first = cached("llm", by_home, "cpu", torch.float32, FakeModel)
    second = cached("llm", by_absolute, "cpu", torch.float32, FakeModel)

    assert first is second


def test_cache_failed_factory_not_cached(tmp_path: Path) -> None:
    source = resolve_source(str(make_model_folder(tmp_path / "m")), "llm")

    def failing():
        raise ModelLoadError("broken")

    with pytest.raises(ModelLoadError):
        cached("llm", source, "cpu", torch.float32, failing)

    assert cached_count() == 0
    assert isinstance(cached("llm", source, "cpu", torch.float32, FakeModel), FakeModel)


def test_release_models_by_role(tmp_path: Path) -> None:
    source = resolve_source(str(make_model_folder(tmp_path / "m")), "llm")
    llm = cached("llm", source, "cpu", torch.float32, FakeModel)
    vlm = cached("vlm", source, "cpu", torch.float32, FakeModel)

    assert release_models("llm") == 1
    assert llm.released
    assert not vlm.released
    assert cached_count() == 1

    assert release_models() == 1
    assert vlm.released
    assert release_models() == 0

    rebuilt = cached("llm", source, "cpu", torch.float32, FakeModel)
    assert rebuilt is not llm


def test_release_models_without_release_method(tmp_path: Path) -> None:
    source = resolve_source(str(make_model_folder(tmp_path / "m")), "scorer")
    cached("scorer", source, "cpu", torch.float32, dict)

    assert release_models() == 1


def test_discard_keeps_model_usable(tmp_path: Path) -> None:
    source = resolve_source(str(make_model_folder(tmp_path / "m")), "llm")
    model = cached("llm", source, "cpu", torch.float32, FakeModel)

    assert discard(model)
    assert not discard(model)
    assert not model.released
    assert cached_count() == 0


def test_cache_threads_build_once(tmp_path: Path) -> None:
    source = resolve_source(str(make_model_folder(tmp_path / "m")), "llm")
    builds = []
    results = []

    def slow_factory():
        builds.append(1)
        time.sleep(0.2)
        return FakeModel()

    def worker():
        results.append(cached("llm", source, "cpu", torch.float32, slow_factory))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert len(builds) == 1
    assert len(results) == 4
    assert all(result is results[0] for result in results)
