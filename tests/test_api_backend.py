"""OpenAI-compatible API backend against a real HTTP server on 127.0.0.1.

The server (``openai_test_server.OpenAITestServer``) runs image requests on a tiny random-weight
Qwen2.5-VL and text requests on the same VLM or on the real SmolLM2 GGUF.
Random weights give near-constant noise, so the tests check protocol, order, retries, errors
and the handling of the API key, never wording.
"""

from __future__ import annotations

import base64
import io
import logging
import socket
import time

import pytest
from PIL import Image

from openai_test_server import OpenAITestServer
from patch_matters_core.config import GenerationSettings, PipelineConfig
from patch_matters_core.errors import ConfigError, ModelLoadError
from patch_matters_core.models import loading
from patch_matters_core.models.api import (
    APIRequestError,
    OpenAICompatibleModel,
    api_key_from_environment,
    image_data_url,
    is_api_spec,
    load_api_model,
    parse_api_spec,
)
from patch_matters_core.models.base import ChatRequest, TextModel, VisionLanguageModel, VisionRequest
from patch_matters_core.models.vlm import load_vlm

MODEL_ID = "tiny-qwen"
SECRET = "sk-test-4f9a1c7e2b8d6035"
SHORT = GenerationSettings(max_new_tokens=4, temperature=0.0, do_sample=False)
SAMPLING = GenerationSettings(max_new_tokens=4, temperature=0.7, top_p=0.8)


@pytest.fixture(autouse=True)
def no_api_key(monkeypatch):
    """Start every test without a key in the environment."""
    monkeypatch.delenv("PATCH_MATTERS_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)


@pytest.fixture(scope="module")
def tiny_vlm(tiny_models):
    vlm = load_vlm(str(tiny_models / "vlm-qwen2_5_vl"), device="cpu", dtype="float32")
    yield vlm
    loading.release_models()


@pytest.fixture
def server(tiny_vlm):
    with OpenAITestServer(vision_model=tiny_vlm, model_ids=[MODEL_ID, "other-model"]) as running:
        yield running


def client(server: OpenAITestServer, **kwargs) -> OpenAICompatibleModel:
    kwargs.setdefault("backoff_s", 0.01)
    return load_api_model(f"{MODEL_ID}@{server.base_url}", **kwargs)


def red_square(side: int = 40) -> Image.Image:
    return Image.new("RGB", (side, side), (200, 30, 30))


def free_port() -> int:
    """Return a port on 127.0.0.1 that nothing listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# Spec parsing.


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("qwen2.5-vl-7b@http://127.0.0.1:8080/v1", ("qwen2.5-vl-7b", "http://127.0.0.1:8080/v1")),
        ("gpt-4o@https://api.openai.com/v1/", ("gpt-4o", "https://api.openai.com/v1")),
        ("http://localhost:11434/v1", (None, "http://localhost:11434/v1")),
        ("  llava:13b@HTTP://localhost:11434/v1  ", ("llava:13b", "http://localhost:11434/v1")),
        ("@cf/meta/llama-3@https://gateway.example.com/v1", ("@cf/meta/llama-3", "https://gateway.example.com/v1")),
    ],
)
def test_parse_api_spec_valid(spec, expected):
    assert is_api_spec(spec)
    assert parse_api_spec(spec) == expected


@pytest.mark.parametrize(
    "spec",
    ["Qwen/Qwen2-VL-2B-Instruct", "/models/qwen", "C:\\models\\qwen", "model.gguf", "me@example.com", "", None],
)
def test_is_api_spec_rejects_other_specs(spec):
    assert not is_api_spec(spec)


@pytest.mark.parametrize(
    ("spec", "message_part"),
    [
        ("@http://127.0.0.1:8080/v1", "empty model name"),
        ("model@http:///v1", "host name"),
        ("model@http://127.0.0.1:99999/v1", "port"),
        ("model@http://127.0.0.1:8080/v1/chat/completions", "/chat/completions"),
        ("http://127.0.0.1:8080/v1/models", "/models"),
        ("model@http://127.0.0.1:8080/v1?api-version=1", "query"),
        ("Qwen/Qwen2-VL-2B-Instruct", "MODEL@BASE_URL"),
    ],
)
def test_parse_api_spec_invalid(spec, message_part):
    with pytest.raises(ConfigError) as raised:
        parse_api_spec(spec)
    assert message_part in str(raised.value)


def test_parse_api_spec_rejects_url_credentials():
    with pytest.raises(ConfigError) as raised:
        parse_api_spec("gpt-4o@https://alice:hunter2secret@api.example.com/v1")

    message = str(raised.value)
    assert "PATCH_MATTERS_API_KEY" in message
    assert "hunter2secret" not in message
    assert "alice" not in message


def test_api_key_from_environment_order():
    assert api_key_from_environment({"PATCH_MATTERS_API_KEY": "a", "OPENAI_API_KEY": "b"}) == "a"
    assert api_key_from_environment({"PATCH_MATTERS_API_KEY": " ", "OPENAI_API_KEY": "b"}) == "b"
    assert api_key_from_environment({}) is None


def test_image_data_url_round_trip():
    url = image_data_url(Image.new("RGBA", (30, 20), (10, 200, 10, 128)))

    assert url.startswith("data:image/jpeg;base64,")
    decoded = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert decoded.format == "JPEG"
    assert decoded.size == (30, 20)
    assert decoded.mode == "RGB"


# Loading.


def test_load_bare_url_takes_first_model(server):
    model = load_api_model(server.base_url, role="llm")

    assert model.model == MODEL_ID
    assert model.info.role == "llm"
    assert model.info.source == f"{MODEL_ID}@{server.base_url}"
    assert model.info.family == "openai-compatible"
    assert model.info.device == "remote"
    assert model.min_side == 28
    assert isinstance(model, VisionLanguageModel)
    assert isinstance(model, TextModel)


def test_load_unlisted_model_warns(server, caplog):
    caplog.set_level(logging.WARNING, logger="patch_matters_core.models.api")

    model = load_api_model(f"not-listed@{server.base_url}")

    assert model.model == "not-listed"
    assert "not among the 2 models" in caplog.text


def test_load_refused_connection_names_url():
    url = f"http://127.0.0.1:{free_port()}/v1"

    with pytest.raises(ModelLoadError) as raised:
        load_api_model(f"model@{url}")

    message = str(raised.value)
    assert url in message
    assert "must be running" in message


def test_load_bare_url_without_models(tiny_vlm):
    with OpenAITestServer(vision_model=tiny_vlm, model_ids=[]) as empty:
        with pytest.raises(ModelLoadError) as raised:
            load_api_model(empty.base_url)

    assert "lists no models" in str(raised.value)


# Requests and responses.


def test_describe_sends_image_and_settings(server):
    model = client(server)
    images = [red_square(40), Image.new("RGB", (64, 32), (0, 0, 255))]
    requests = [VisionRequest(image=image, prompt=f"Describe picture {i}.") for i, image in enumerate(images)]

    generations = model.describe(requests, SAMPLING, seed=7)

    assert len(generations) == 2
    assert all(isinstance(generation.raw, str) for generation in generations)
    bodies = sorted(server.bodies, key=lambda body: body["seed"])
    assert [body["seed"] for body in bodies] == [7, 8]
    for index, body in enumerate(bodies):
        assert body["model"] == MODEL_ID
        assert body["max_tokens"] == 4
        assert body["temperature"] == 0.7
        assert body["top_p"] == 0.8
        [message] = body["messages"]
        assert message["role"] == "user"
        image_part, text_part = message["content"]
        assert image_part["type"] == "image_url"
        assert image_part["image_url"]["url"].startswith("data:image/jpeg;base64,")
        assert text_part == {"type": "text", "text": f"Describe picture {index}."}
        sent = Image.open(io.BytesIO(base64.b64decode(image_part["image_url"]["url"].split(",", 1)[1])))
        assert sent.size == images[index].size


def test_greedy_settings_send_zero_temperature(server):
    model = client(server)

    model.chat([ChatRequest(user="Hello")], SHORT, seed=None)

    [body] = server.bodies
    assert body["temperature"] == 0.0
    assert "seed" not in body


def test_answers_keep_request_order(server):
    server.append_prompt = True
    prompts = [f"Describe picture {i}." for i in range(8)]
    # Early requests get the longest delays, so responses arrive out of request order.
    server.prompt_delays = {prompt: 0.05 * (len(prompts) - i) for i, prompt in enumerate(prompts)}
    model = client(server, max_in_flight=4)
    labels = []

    generations = model.describe(
        [VisionRequest(image=red_square(), prompt=prompt) for prompt in prompts], SHORT, progress=labels.append
    )

    assert server.finished_prompts != prompts
    # At most max_in_flight at once; a loaded machine may start them less evenly.
    assert server.max_concurrent <= 4
    assert server.max_concurrent >= 2
    assert labels == ["describe"] * len(prompts)
    for prompt, generation in zip(prompts, generations):
        assert generation.raw.endswith(f"[prompt: {prompt}]")


def test_progress_exception_cancels_call(server):
    model = client(server, max_in_flight=1)

    class Cancelled(Exception):
        pass

    def cancel(label: str) -> None:
        raise Cancelled(label)

    with pytest.raises(Cancelled):
        model.chat([ChatRequest(user=f"Question {i}") for i in range(6)], SHORT, progress=cancel)

    assert len(server.bodies) < 6


def test_finish_reason_length_sets_token_limit(server):
    server.finish_reason = "length"
    model = client(server)

    [generation] = model.chat([ChatRequest(user="Hello")], SHORT)

    assert generation.hit_token_limit


def test_finish_reason_stop_keeps_token_limit_false(server):
    server.finish_reason = "stop"
    model = client(server)

    [generation] = model.chat([ChatRequest(user="Hello")], SHORT)

    assert not generation.hit_token_limit


def test_missing_content_gives_empty_answer(server, caplog):
    caplog.set_level(logging.WARNING, logger="patch_matters_core.models.api")
    server.missing_content_count = 1
    model = client(server)

    [generation] = model.chat([ChatRequest(user="Hello")], SHORT)

    assert generation.text == ""
    assert "no message text" in caplog.text
    assert "content_filter" in caplog.text


@pytest.mark.parametrize("echo", [True, False])
def test_prefill_appears_once(server, echo):
    server.echo_prefill = echo
    model = client(server)
    prefill = "The picture shows"

    [generation] = model.chat([ChatRequest(user="Describe a cat.", system="Be brief.", prefill=prefill)], SHORT)

    assert generation.raw.startswith(prefill)
    assert not generation.raw[len(prefill):].lstrip().startswith(prefill)
    assert generation.text.startswith(prefill)
    [body] = server.bodies
    assert body["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Describe a cat."},
        {"role": "assistant", "content": prefill},
    ]


def test_empty_request_list_sends_nothing(server):
    model = client(server)

    assert model.describe([], SHORT) == []
    assert model.chat([], SHORT) == []
    assert server.bodies == []


# Failures, retries and timeouts.


def test_retries_after_503(server, caplog):
    caplog.set_level(logging.WARNING, logger="patch_matters_core.models.api")
    model = client(server)
    server.fail_count = 2

    [generation] = model.chat([ChatRequest(user="Hello")], SHORT)

    assert isinstance(generation.raw, str)
    assert len(server.bodies) == 3
    retries = [record for record in caplog.records if "retrying" in record.getMessage()]
    assert len(retries) == 2
    assert "HTTP 503" in retries[0].getMessage()
    assert "attempt 2 of 3" in retries[0].getMessage()


def test_retries_exhausted_raise_error(server):
    model = client(server)
    server.fail_count = 10
    server.fail_status = 502
    server.fail_message = "upstream model crashed"

    with pytest.raises(APIRequestError) as raised:
        model.chat([ChatRequest(user="Hello")], SHORT)

    message = str(raised.value)
    assert f"{server.base_url}/chat/completions" in message
    assert "HTTP 502" in message
    assert "upstream model crashed" in message
    assert raised.value.status == 502
    assert len(server.bodies) == 3


def test_unknown_model_not_retried(server):
    model = client(server)
    model.model = "missing-model"

    with pytest.raises(APIRequestError) as raised:
        model.chat([ChatRequest(user="Hello")], SHORT)

    assert "HTTP 404" in str(raised.value)
    assert "`missing-model` does not exist" in str(raised.value)
    assert len(server.bodies) == 1


def test_connection_reset_is_retried(server, caplog):
    caplog.set_level(logging.WARNING, logger="patch_matters_core.models.api")
    model = client(server)
    server.reset_count = 1

    [generation] = model.chat([ChatRequest(user="Hello")], SHORT)

    assert isinstance(generation.raw, str)
    assert len(server.bodies) == 2
    assert "connection closed" in caplog.text


def test_malformed_json_raises_error(server):
    model = client(server)
    server.malformed_count = 1

    with pytest.raises(APIRequestError) as raised:
        model.chat([ChatRequest(user="Hello")], SHORT)

    message = str(raised.value)
    assert "not valid JSON" in message
    assert f"{server.base_url}/chat/completions" in message


def test_slow_server_times_out(server):
    model = client(server, timeout=0.3)
    server.delay_s = 3.0
    started = time.perf_counter()

    with pytest.raises(APIRequestError) as raised:
        model.chat([ChatRequest(user="Hello")], SHORT)

    assert "timed out after 0.3 s" in str(raised.value)
    assert time.perf_counter() - started < 2.5


# API key.


def test_key_sent_as_bearer(server, monkeypatch):
    monkeypatch.setenv("PATCH_MATTERS_API_KEY", SECRET)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai-other")
    server.required_key = SECRET

    model = client(server)
    model.chat([ChatRequest(user="Hello")], SHORT)

    assert server.authorization_headers == [f"Bearer {SECRET}", f"Bearer {SECRET}"]


def test_openai_key_is_fallback(server, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)

    client(server)

    assert server.authorization_headers == [f"Bearer {SECRET}"]


def test_no_key_sends_no_header(server):
    client(server)

    assert server.authorization_headers == [None]


def test_wrong_key_names_variable(server, monkeypatch):
    monkeypatch.setenv("PATCH_MATTERS_API_KEY", SECRET)
    server.required_key = "sk-the-right-one"

    with pytest.raises(ModelLoadError) as raised:
        client(server)

    message = str(raised.value)
    assert "HTTP 401" in message
    assert "PATCH_MATTERS_API_KEY" in message
    assert SECRET not in message
    assert SECRET not in repr(raised.value)


def test_key_rejected_during_chat(server, monkeypatch):
    monkeypatch.setenv("PATCH_MATTERS_API_KEY", SECRET)
    model = client(server)
    server.required_key = "sk-rotated"

    with pytest.raises(ModelLoadError) as raised:
        model.chat([ChatRequest(user="Hello")], SHORT)

    assert "HTTP 401" in str(raised.value)
    assert SECRET not in str(raised.value)


def test_key_never_leaks(server, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("PATCH_MATTERS_API_KEY", SECRET)
    server.required_key = SECRET

    model = client(server)
    server.fail_count = 1
    model.describe([VisionRequest(image=red_square(), prompt="Describe it.")], SHORT, seed=1)

    # A server that repeats the key in its error message.
    server.fail_count = 10
    server.fail_message = f"Quota exceeded for key {SECRET}."
    with pytest.raises(APIRequestError) as server_error:
        model.chat([ChatRequest(user="Hello")], SHORT)

    server.required_key = "sk-rotated"
    with pytest.raises(ModelLoadError) as auth_error:
        model.chat([ChatRequest(user="Hello")], SHORT)

    assert server.authorization_headers[0] == f"Bearer {SECRET}"
    assert "retrying" in caplog.text
    assert SECRET not in caplog.text
    assert SECRET not in str(server_error.value)
    assert SECRET not in repr(server_error.value)
    assert "Quota exceeded for key ***" in str(server_error.value)
    assert SECRET not in str(auth_error.value)
    assert SECRET not in repr(model)
    assert SECRET not in str(model.info.to_dict())


def test_constructor_rejects_invalid_settings():
    with pytest.raises(ConfigError):
        OpenAICompatibleModel("m", "http://127.0.0.1:1/v1", max_in_flight=0)
    with pytest.raises(ConfigError):
        OpenAICompatibleModel("m", "http://127.0.0.1:1/v1", max_attempts=0)
    with pytest.raises(ConfigError):
        OpenAICompatibleModel("m", "http://127.0.0.1:1/v1", timeout=0)


# SmolLM2 behind the server.


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    from patch_matters_core.models.llm import load_llm

    model = load_llm(str(smollm2_gguf), device="cpu")
    yield model
    loading.release_models()


@pytest.fixture
def full_server(tiny_vlm, smollm2):
    with OpenAITestServer(vision_model=tiny_vlm, text_model=smollm2, model_ids=[MODEL_ID]) as running:
        yield running


@pytest.mark.slow
@pytest.mark.parametrize("echo", [True, False])
def test_smollm2_prefill_through_api(full_server, echo):
    full_server.echo_prefill = echo
    model = client(full_server, role="llm")
    request = ChatRequest(user="List three colours as a JSON array of strings.", prefill='["')

    [generation] = model.chat([request], GenerationSettings(max_new_tokens=12, temperature=0.0, do_sample=False))

    assert generation.raw.startswith('["')
    assert not generation.raw.startswith('["["')
    assert generation.text.startswith('["')
    assert len(generation.raw) > 2


@pytest.mark.slow
def test_pipeline_runs_on_api_model(full_server, coco_images):
    from patch_matters_core.pipeline import PatchMatters

    api_vlm = client(full_server, role="vlm")
    # One sample per patch skips the LLM sorting, whose long prompts took SmolLM2 about three
    # minutes on a shared 2-core CPU; the aggregation still sends text requests with a prefill.
    config = PipelineConfig().with_max_new_tokens(24).with_samples(1)
    pipeline = PatchMatters(vlm=api_vlm, detector=None, scorer=None, config=config)

    trace = pipeline.run(coco_images[0]["path"])

    assert trace.caption.strip()
    assert trace.models["vlm"].source == f"{MODEL_ID}@{full_server.base_url}"
    assert trace.models["vlm"].family == "openai-compatible"
    image_requests = [body for body in full_server.bodies if isinstance(body["messages"][-1]["content"], list)]
    text_requests = [body for body in full_server.bodies if body not in image_requests]
    assert len(image_requests) == 5
    assert text_requests
    assert all(body["messages"][-1]["role"] == "assistant" for body in text_requests)
