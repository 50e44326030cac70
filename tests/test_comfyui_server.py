"""The pack inside a real ComfyUI server: node list, the step-by-step workflow, cancel and memory.

Runs when PATCH_MATTERS_COMFYUI names a ComfyUI checkout, with the Python of
PATCH_MATTERS_COMFYUI_PYTHON (default: this interpreter), which needs ComfyUI's requirements
and this package's dependencies. The server listens on 127.0.0.1 only, keeps its input,
output, user and temp folders in a temporary folder, and is stopped by its PID.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from comfyui_helpers import ROOT

COMFYUI = os.environ.get("PATCH_MATTERS_COMFYUI", "")
COMFYUI_PYTHON = os.environ.get("PATCH_MATTERS_COMFYUI_PYTHON", sys.executable)

pytestmark = [
    pytest.mark.comfyui,
    pytest.mark.slow,
    pytest.mark.skipif(
        not COMFYUI, reason="PATCH_MATTERS_COMFYUI is not set; point it at a ComfyUI checkout to run the server tests"
    ),
]
STEP_BY_STEP_API = ROOT / "workflows" / "api" / "patch_matters_step_by_step.json"
STARTUP_SECONDS = 180
RUN_SECONDS = 600


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.load(response)


def _post(url: str, payload: dict | None = None) -> dict:
    body = json.dumps(payload or {}).encode()
    request = urllib.request.Request(url, body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        text = response.read().decode()
    return json.loads(text) if text.strip() else {}


class Server:
    def __init__(self, url: str, process: subprocess.Popen, log_path: Path) -> None:
        self.url = url
        self.process = process
        self.log_path = log_path

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def submit(self, graph: dict) -> str:
        response = _post(f"{self.url}/prompt", {"prompt": graph, "client_id": uuid.uuid4().hex})
        assert response.get("node_errors") == {}, response
        return response["prompt_id"]

    def wait(self, prompt_id: str, seconds: float = RUN_SECONDS) -> dict:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            history = _get(f"{self.url}/history/{prompt_id}")
            entry = history.get(prompt_id)
            if entry and entry.get("status", {}).get("status_str") in ("success", "error"):
                return entry
            assert self.process.poll() is None, f"ComfyUI exited; log tail:\n{self.log()[-3000:]}"
            time.sleep(1)
        raise AssertionError(f"prompt {prompt_id} did not finish in {seconds} s; log tail:\n{self.log()[-3000:]}")


@pytest.fixture(scope="module")
def comfyui(tmp_path_factory, tiny_models, coco_images) -> Server:
    checkout = Path(COMFYUI)
    if not (checkout / "main.py").is_file():
        pytest.skip(f"PATCH_MATTERS_COMFYUI={COMFYUI} has no main.py, so it is not a ComfyUI checkout")

    base = tmp_path_factory.mktemp("comfyui")
    for folder in ("custom_nodes", "models/LLM", "models/detection", "models/itm", "input", "output", "temp", "user"):
        (base / folder).mkdir(parents=True)
    # A folder with only this pack, so that ComfyUI loads nothing else from the pack's parent.
    (base / "custom_nodes" / "patch-matters").symlink_to(ROOT, target_is_directory=True)
    (base / "models" / "LLM" / "vlm-qwen2_5_vl").symlink_to(tiny_models / "vlm-qwen2_5_vl")
    (base / "models" / "detection" / "det-owlv2").symlink_to(tiny_models / "det-owlv2")
    (base / "models" / "itm" / "itm-blip").symlink_to(tiny_models / "itm-blip")

    from PIL import Image

    with Image.open(coco_images[0]["path"]) as photo:
        photo.convert("RGB").resize((160, 120)).save(base / "input" / "photo.png")

    config = base / "extra_model_paths.yaml"
    config.write_text(
        "patch_matters_test:\n"
        f"    base_path: {base}\n"
        "    custom_nodes: custom_nodes\n"
        "    LLM: models/LLM\n"
        "    detection: models/detection\n"
        "    itm: models/itm\n",
        encoding="utf-8",
    )

    port = _free_port()
    log_path = base / "comfyui.log"
    command = [
        COMFYUI_PYTHON, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
        "--disable-api-nodes", "--disable-auto-launch", "--extra-model-paths-config", str(config),
        "--base-directory", str(base), "--database-url", "sqlite:///:memory:",
    ]
    with open(log_path, "w", encoding="utf-8") as log_file:
        process = subprocess.Popen(command, cwd=checkout, stdout=log_file, stderr=subprocess.STDOUT,
                                   env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"})
    server = Server(f"http://127.0.0.1:{port}", process, log_path)

    try:
        deadline = time.monotonic() + STARTUP_SECONDS
        while True:
            if process.poll() is not None:
                pytest.fail(f"ComfyUI exited with code {process.returncode}; log tail:\n{server.log()[-3000:]}")
            try:
                _get(f"{server.url}/system_stats")
                break
            except (urllib.error.URLError, ConnectionError):
                if time.monotonic() > deadline:
                    pytest.fail(f"ComfyUI did not answer within {STARTUP_SECONDS} s; log tail:\n{server.log()[-3000:]}")
                time.sleep(1)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)


def step_by_step_graph(seed: int, samples: int = 2, max_new_tokens: int = 8) -> dict:
    """The API form of the step-by-step workflow, set to the tiny test models and short outputs."""
    graph = json.loads(STEP_BY_STEP_API.read_text(encoding="utf-8"))
    by_class = {node["class_type"]: node["inputs"] for node in graph.values()}
    by_class["LoadImage"]["image"] = "photo.png"
    by_class["PatchMattersVLMLoader"]["model"] = "vlm-qwen2_5_vl"
    by_class["PatchMattersDetectorLoader"]["model"] = "det-owlv2"
    by_class["PatchMattersScorerLoader"]["model"] = "itm-blip"
    by_class["PatchMattersLocalDescribe"].update(samples=samples, max_new_tokens=max_new_tokens, seed=seed)
    by_class["PatchMattersSemanticFilter"]["max_new_tokens"] = 16
    by_class["PatchMattersHierarchicalAggregate"]["max_new_tokens"] = 16
    return graph


def _node_id(graph: dict, class_type: str) -> str:
    return next(node_id for node_id, node in graph.items() if node["class_type"] == class_type)


def test_object_info_lists_pack_nodes(comfyui):
    info = _get(f"{comfyui.url}/object_info")
    pack_nodes = {name for name in info if name.startswith("PatchMatters")}
    assert len(pack_nodes) == 9
    assert info["PatchMattersVLMLoader"]["input"]["required"]["model"][0] == ["vlm-qwen2_5_vl"]
    assert info["PatchMattersDetectorLoader"]["input"]["required"]["model"][0] == ["none", "det-owlv2"]
    assert info["PatchMattersScorerLoader"]["input"]["required"]["model"][0] == ["none", "itm-blip"]


def test_step_by_step_workflow_runs_to_caption(comfyui):
    graph = step_by_step_graph(seed=1)
    entry = comfyui.wait(comfyui.submit(graph))

    assert entry["status"]["status_str"] == "success", entry["status"]
    outputs = entry["outputs"]
    (caption,) = outputs[_node_id(graph, "PatchMattersHierarchicalAggregate")]["text"]
    assert isinstance(caption, str) and caption.strip()
    (report,) = outputs[_node_id(graph, "PatchMattersSemanticFilter")]["text"]
    assert "kept" in report
    assert len(outputs[_node_id(graph, "PreviewImage")]["images"]) == 1

    held = _get(f"{comfyui.url}/patch_matters/models")
    assert held["cached"] == {"vlm": 0, "llm": 0, "detector": 0, "scorer": 0}
    assert held["registered_with_comfyui"] == 0
    assert held["released_but_alive"] == 0


def test_interrupt_stops_describe_within_one_call(comfyui):
    graph = step_by_step_graph(seed=2, samples=3, max_new_tokens=24)
    log_start = len(comfyui.log())
    prompt_id = comfyui.submit(graph)

    deadline = time.monotonic() + RUN_SECONDS
    while "Described the whole image" not in comfyui.log()[log_start:]:
        assert time.monotonic() < deadline, "LocalDescribe did not start"
        time.sleep(0.2)
    _post(f"{comfyui.url}/interrupt")
    interrupt_at = len(comfyui.log())
    entry = comfyui.wait(prompt_id)

    kinds = [message[0] for message in entry["status"]["messages"]]
    assert "execution_interrupted" in kinds
    interrupted = next(message[1] for message in entry["status"]["messages"] if message[0] == "execution_interrupted")
    assert interrupted["node_type"] == "PatchMattersLocalDescribe"
    # Only the generation that was running when the interrupt arrived may finish.
    assert comfyui.log()[interrupt_at:].count("VLM generate:") <= 1

    held = _get(f"{comfyui.url}/patch_matters/models")
    assert held["cached"]["vlm"] == 0
    assert held["released_but_alive"] == 0

    rerun = comfyui.wait(comfyui.submit(step_by_step_graph(seed=3)))
    assert rerun["status"]["status_str"] == "success", rerun["status"]
