"""An HTTP server that implements the OpenAI chat API with real local models, for tests.

``OpenAITestServer`` listens on 127.0.0.1 on a free port and serves ``GET /v1/models`` and
``POST /v1/chat/completions``. Requests with an ``image_url`` part go to a
``VisionLanguageModel``; text-only requests go to a ``TextModel`` (the VLM's own ``chat`` when
none is given). A trailing assistant message is the prefill that the response continues. Like vLLM or a
llama.cpp server with several slots, the server runs requests that arrive together as one
batch: one worker thread collects the requests of the same kind and settings that arrive within
``batch_window_s`` and passes up to ``max_batch_size`` of them to one model call.

Attributes switch on the failures that real servers show: error statuses for the next N
requests, dropped connections, bodies that are not JSON, responses without text, a forced
``finish_reason``, slow responses, a required API key, and responses that repeat the prefill or not.
The server records each request body, each Authorization header and the order in which
responses were finished, so tests can check what a client sent.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Optional, Sequence

from PIL import Image

from patch_matters_core.config import GenerationSettings
from patch_matters_core.errors import ConfigError
from patch_matters_core.models.base import ChatRequest, Generation, VisionRequest

logger = logging.getLogger(__name__)


class RequestRejected(Exception):
    """Rejection of a request, sent as an OpenAI error body with an HTTP status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class OpenAITestServer:
    """OpenAI-compatible server on 127.0.0.1 backed by real models; use it as a context manager."""

    def __init__(
        self,
        vision_model: Any = None,
        text_model: Any = None,
        model_ids: Sequence[str] = ("test-model",),
        max_batch_size: int = 8,
        batch_window_s: float = 0.02,
    ) -> None:
        self.vision_model = vision_model
        self.text_model = text_model
        self.model_ids = list(model_ids)
        self.max_batch_size = max_batch_size
        self.batch_window_s = batch_window_s

        # Failure switches. Counters apply to the next POST requests and count down.
        self.fail_count = 0
        self.fail_status = 503
        self.fail_message = "The server is overloaded; try again."
        self.reset_count = 0
        self.malformed_count = 0
        self.missing_content_count = 0
        self.finish_reason: Optional[str] = None
        self.delay_s = 0.0
        # Extra delay for requests whose last user text equals a key.
        self.prompt_delays: dict[str, float] = {}
        self.required_key: Optional[str] = None
        self.echo_prefill = True
        # Appends " [prompt: USER TEXT]" to every response, so a test can match responses to requests.
        self.append_prompt = False

        # Records.
        self.bodies: list[dict[str, Any]] = []
        self.authorization_headers: list[Optional[str]] = []
        self.finished_prompts: list[str] = []
        self.max_concurrent = 0
        self.batch_sizes: list[int] = []

        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._active = 0
        self._pending: list[_Job] = []
        self._pending_changed = threading.Condition()
        self._httpd: Optional[ThreadingHTTPServer] = None
        self._thread: Optional[threading.Thread] = None
        self._worker: Optional[threading.Thread] = None

    # Lifecycle.

    def start(self) -> "OpenAITestServer":
        handler = type("BoundHandler", (_Handler,), {"owner": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="openai-test-server", daemon=True)
        self._thread.start()
        self._worker = threading.Thread(target=self._run_batches, name="openai-test-server-model", daemon=True)
        self._worker.start()
        logger.info("OpenAI test server listening at %s.", self.base_url)
        return self

    def stop(self) -> None:
        """Stop serving; requests still sleeping in a delay get no response."""
        self._stopping.set()
        with self._pending_changed:
            self._pending_changed.notify_all()
        if self._worker is not None:
            self._worker.join(timeout=60)
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._httpd = None
        self._thread = None
        self._worker = None

    def __enter__(self) -> "OpenAITestServer":
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("The test server is not running; call start() first.")
        return self._httpd.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    # Request handling, called from the handler threads.

    def take(self, counter: str) -> bool:
        """Decrement the named failure counter and return True when it was above zero."""
        with self._lock:
            value = getattr(self, counter)
            if value <= 0:
                return False
            setattr(self, counter, value - 1)
            return True

    def record(self, body: Optional[dict[str, Any]], authorization: Optional[str]) -> None:
        with self._lock:
            self.authorization_headers.append(authorization)
            if body is not None:
                self.bodies.append(body)

    def enter(self) -> None:
        with self._lock:
            self._active += 1
            self.max_concurrent = max(self.max_concurrent, self._active)

    def leave(self) -> None:
        with self._lock:
            self._active -= 1

    def check_key(self, authorization: Optional[str]) -> None:
        if self.required_key is not None and authorization != f"Bearer {self.required_key}":
            raise RequestRejected(401, "Incorrect API key provided.")

    def models_payload(self) -> dict[str, Any]:
        return {"object": "list", "data": [{"id": name, "object": "model", "owned_by": "tests"} for name in self.model_ids]}

    def complete(self, body: dict[str, Any]) -> dict[str, Any]:
        """Run one chat completion request through the models and return the response payload."""
        if body.get("model") not in self.model_ids:
            raise RequestRejected(404, f"The model `{body.get('model')}` does not exist.")
        system, user_text, images, prefill = _parse_messages(body.get("messages"))
        settings = _settings(body)
        seed = body.get("seed")

        delay = self.delay_s + self.prompt_delays.get(user_text, 0.0)
        if delay and self._stopping.wait(delay):
            raise ConnectionAbortedError("the test server is stopping")

        generation = self._generate(system, user_text, images, prefill, settings, seed)

        content = generation.raw
        if prefill and not self.echo_prefill and content.startswith(prefill):
            content = content[len(prefill):]
        if self.append_prompt:
            content += f" [prompt: {user_text}]"
        finish_reason = self.finish_reason or ("length" if generation.hit_token_limit else "stop")

        with self._lock:
            self.finished_prompts.append(user_text)
        return {
            "id": f"chatcmpl-{len(self.bodies)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body["model"],
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish_reason}
            ],
        }

    def _generate(
        self,
        system: Optional[str],
        user_text: str,
        images: list[Image.Image],
        prefill: str,
        settings: GenerationSettings,
        seed: Optional[int],
    ) -> Generation:
        """Queue one request for the model worker and wait for its generation."""
        if images:
            if self.vision_model is None:
                raise RequestRejected(400, "This model does not accept image input.")
            if len(images) > 1:
                raise RequestRejected(400, "Only one image per request is supported.")
            job = _Job("vision", settings, seed, VisionRequest(image=images[0], prompt=user_text))
        else:
            if self.text_model is None and self.vision_model is None:
                raise RequestRejected(400, "The server has no model for text requests.")
            job = _Job("text", settings, seed, ChatRequest(user=user_text, system=system, prefill=prefill))

        with self._pending_changed:
            self._pending.append(job)
            self._pending_changed.notify_all()
        while not job.done.wait(0.1):
            if self._stopping.is_set():
                raise ConnectionAbortedError("the test server is stopping")
        if job.error is not None:
            raise job.error
        return job.generation

    def _run_batches(self) -> None:
        """Run queued requests in batches until the server stops; runs in the worker thread."""
        while True:
            with self._pending_changed:
                while not self._pending and not self._stopping.is_set():
                    self._pending_changed.wait(0.1)
                if self._stopping.is_set():
                    return

            # Requests sent at the same time arrive within a few milliseconds of each other.
            time.sleep(self.batch_window_s)

            with self._pending_changed:
                first = self._pending[0]
                batch = [job for job in self._pending if job.kind == first.kind and job.settings == first.settings]
                batch = batch[: self.max_batch_size]
                for job in batch:
                    self._pending.remove(job)
            self._run_batch(batch)

    def _run_batch(self, batch: list["_Job"]) -> None:
        # A batch shares one seed, the first request's, as one generate call does.
        seed = batch[0].seed
        requests = [job.request for job in batch]
        try:
            if batch[0].kind == "vision":
                generations = self.vision_model.describe(requests, batch[0].settings, seed=seed)
            else:
                text_model = self.text_model or self.vision_model
                generations = text_model.chat(requests, batch[0].settings, seed=seed)
        except Exception as error:
            logger.exception("The test server's model failed on a batch of %d requests.", len(batch))
            for job in batch:
                job.error = RequestRejected(500, f"Internal error: {error}")
                job.done.set()
            return

        with self._lock:
            self.batch_sizes.append(len(batch))
        for job, generation in zip(batch, generations):
            job.generation = generation
            job.done.set()


@dataclass
class _Job:
    """One request waiting for the model worker, and its result once the worker has run it."""

    kind: str
    settings: GenerationSettings
    seed: Optional[int]
    request: Any
    done: threading.Event = field(default_factory=threading.Event)
    generation: Optional[Generation] = None
    error: Optional[Exception] = None


class _Handler(BaseHTTPRequestHandler):
    owner: OpenAITestServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("test server: " + format, *args)

    def do_GET(self) -> None:
        authorization = self.headers.get("Authorization")
        self.owner.record(None, authorization)
        try:
            self.owner.check_key(authorization)
            if self.path.rstrip("/") != "/v1/models":
                raise RequestRejected(404, f"No route for GET {self.path}.")
            self._send_json(200, self.owner.models_payload())
        except RequestRejected as rejection:
            self._send_error(rejection)

    def do_POST(self) -> None:
        authorization = self.headers.get("Authorization")
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        try:
            body = json.loads(raw)
        except json.JSONDecodeError:
            self.owner.record(None, authorization)
            self._send_error(RequestRejected(400, "The request body is not valid JSON."))
            return
        self.owner.record(body, authorization)

        self.owner.enter()
        try:
            self._answer(body, authorization)
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
            # The client gave up (a timeout) or the server is stopping.
            self.close_connection = True
        finally:
            self.owner.leave()

    def _answer(self, body: dict[str, Any], authorization: Optional[str]) -> None:
        try:
            self.owner.check_key(authorization)
            if self.path.rstrip("/") != "/v1/chat/completions":
                raise RequestRejected(404, f"No route for POST {self.path}.")
            if self.owner.take("reset_count"):
                self._drop_connection()
                return
            if self.owner.take("fail_count"):
                raise RequestRejected(self.owner.fail_status, self.owner.fail_message)
            if self.owner.take("malformed_count"):
                self._send_bytes(200, b'{"choices": [{"message": {"content": "cut off', "application/json")
                return
            if self.owner.take("missing_content_count"):
                payload = {
                    "object": "chat.completion",
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": None}, "finish_reason": "content_filter"}],
                }
                self._send_json(200, payload)
                return
            self._send_json(200, self.owner.complete(body))
        except RequestRejected as rejection:
            self._send_error(rejection)
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
            raise
        except Exception as error:
            logger.exception("The test server failed to answer a chat request.")
            self._send_error(RequestRejected(500, f"Internal error: {error}"))

    def _drop_connection(self) -> None:
        """Close the socket without a response, as a crashing proxy or server does."""
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _send_error(self, rejection: RequestRejected) -> None:
        payload = {"error": {"message": rejection.message, "type": "invalid_request_error", "code": rejection.status}}
        self._send_json(rejection.status, payload)

    def _send_json(self, status: int, payload: dict[str, Any]) -> None:
        self._send_bytes(status, json.dumps(payload).encode("utf-8"), "application/json")

    def _send_bytes(self, status: int, data: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def _parse_messages(messages: Any) -> tuple[Optional[str], str, list[Image.Image], str]:
    """Return (system text, last user text, images of the last user turn, prefill) of a message list."""
    if not isinstance(messages, list) or not messages:
        raise RequestRejected(400, "'messages' must be a non-empty list.")

    prefill = ""
    if messages[-1].get("role") == "assistant":
        prefill = _text_of(messages[-1].get("content"))
        messages = messages[:-1]

    system = None
    user_text = ""
    images: list[Image.Image] = []
    for message in messages:
        role = message.get("role")
        content = message.get("content")
        if role == "system":
            system = _text_of(content)
        elif role == "user":
            user_text = _text_of(content)
            images = _images_of(content)
        else:
            raise RequestRejected(400, f"Unsupported message role {role!r} before the last message.")
    if not user_text and not images:
        raise RequestRejected(400, "The request has no user message.")
    return system, user_text, images, prefill


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if part.get("type") == "text")
    raise RequestRejected(400, "Message content must be a string or a list of parts.")


def _images_of(content: Any) -> list[Image.Image]:
    if not isinstance(content, list):
        return []
    images = []
    for part in content:
        if part.get("type") != "image_url":
            continue
        url = (part.get("image_url") or {}).get("url", "")
        if not url.startswith("data:image/") or ";base64," not in url:
            raise RequestRejected(400, "Only base64 data URLs of images are supported.")
        data = base64.b64decode(url.split(";base64,", 1)[1])
        try:
            images.append(Image.open(io.BytesIO(data)).convert("RGB"))
        except OSError:
            raise RequestRejected(400, "The image data URL does not decode to an image.") from None
    return images


def _settings(body: dict[str, Any]) -> GenerationSettings:
    temperature = float(body.get("temperature", 1.0))
    settings = GenerationSettings(
        max_new_tokens=int(body.get("max_tokens", 16)),
        temperature=temperature,
        top_p=float(body.get("top_p", 1.0)),
        do_sample=temperature > 0,
        repetition_penalty=1.0,
    )
    try:
        settings.validate("request")
    except ConfigError as error:
        raise RequestRejected(400, str(error)) from None
    return settings
