"""Models behind an OpenAI-compatible HTTP API (llama.cpp server, vLLM, LM Studio, Ollama, hosted APIs).

A model argument ``MODEL@BASE_URL`` (``qwen2.5-vl-7b@http://127.0.0.1:8080/v1``) names a model
on a server; a bare ``BASE_URL`` (``http://127.0.0.1:8080/v1``) takes the first model that
``GET BASE_URL/models`` lists. ``OpenAICompatibleModel`` implements both ``VisionLanguageModel``
(an image is sent as a base64 JPEG data URL) and ``TextModel`` through
``POST BASE_URL/chat/completions``.

The API key comes from the environment only: ``PATCH_MATTERS_API_KEY``, else
``OPENAI_API_KEY``. It is sent as ``Authorization: Bearer KEY`` and is never logged, stored in
``ModelInfo`` or put into an error message. Only the standard library is used.
"""

from __future__ import annotations

import base64
import concurrent.futures
import http.client
import io
import json
import logging
import os
import random
import re
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Optional, Sequence

from PIL import Image

from ..config import GenerationSettings
from ..errors import ConfigError, ModelLoadError, PatchMattersError
from ..types import ModelInfo
from .base import ChatRequest, Generation, ProgressCallback, VisionRequest
from .stopping import cut_repetition
from .text import clean_generated_text

logger = logging.getLogger(__name__)

API_KEY_VARIABLES = ("PATCH_MATTERS_API_KEY", "OPENAI_API_KEY")
FAMILY = "openai-compatible"

# HTTP statuses after which a request is sent again: rate limits and temporary server errors.
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})

# Characters of a server's error message kept in logs and exceptions.
_MAX_MESSAGE_CHARS = 300

# Maximum wait between two attempts, also when a server's Retry-After header requests more.
_MAX_BACKOFF_S = 30.0

_SCHEME_IN_SPEC = re.compile(r"@(?=https?://)", re.IGNORECASE)


class APIRequestError(PatchMattersError):
    """A request to an OpenAI-compatible server failed; the message names the URL, status and server message."""

    def __init__(self, message: str, url: str, status: Optional[int] = None) -> None:
        super().__init__(message)
        self.url = url
        self.status = status


# Spec parsing.


def is_api_spec(spec: Any) -> bool:
    """Tell whether a model argument names an OpenAI-compatible server (``MODEL@URL`` or a bare URL)."""
    if not isinstance(spec, str):
        return False
    text = spec.strip()
    return _starts_with_http(text) or _SCHEME_IN_SPEC.search(text) is not None


def parse_api_spec(spec: str) -> tuple[Optional[str], str]:
    """Split ``MODEL@BASE_URL`` into ``(model, base_url)``; a bare URL gives ``(None, base_url)``.

    The split is at the ``@`` that comes right before ``http://`` or ``https://``, so model names
    that contain ``@`` stay whole. The base URL loses trailing slashes. Raises ConfigError when
    the URL has no host, has another scheme, carries credentials, a query or a fragment, or
    ends in an endpoint path (``/chat/completions``, ``/models``) instead of the base URL.
    """
    text = spec.strip() if isinstance(spec, str) else ""
    if not is_api_spec(text):
        raise ConfigError(
            f"Model argument {_redact_url(str(spec))!r} is not an API model; write MODEL@BASE_URL "
            "(for example qwen2.5-vl-7b@http://127.0.0.1:8080/v1) or the base URL alone."
        )

    if _starts_with_http(text):
        model: Optional[str] = None
        url = text
    else:
        match = _SCHEME_IN_SPEC.search(text)
        model = text[: match.start()].strip()
        url = text[match.end():].strip()
        if not model:
            raise ConfigError(
                f"API model argument {_redact_url(text)!r} has an empty model name before '@'; write "
                "MODEL@BASE_URL, or pass the base URL alone to use the server's first model."
            )

    return model, _validate_base_url(url, text)


def _starts_with_http(text: str) -> bool:
    lowered = text.lower()
    return lowered.startswith("http://") or lowered.startswith("https://")


def _validate_base_url(url: str, spec: str) -> str:
    shown = _redact_url(spec)
    try:
        parts = urllib.parse.urlsplit(url)
        parts.hostname
    except ValueError as error:
        raise ConfigError(f"API URL in {shown!r} is invalid ({error}); write it as http://HOST:PORT/v1.") from None

    if parts.username is not None or parts.password is not None:
        raise ConfigError(
            f"API URL in {shown!r} contains credentials (user:password@); remove them from the URL "
            f"and set the key in the environment variable {API_KEY_VARIABLES[0]} instead."
        )
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"API URL in {shown!r} is invalid; it needs http:// or https:// and a host name.")
    try:
        parts.port
    except ValueError:
        raise ConfigError(f"API URL in {shown!r} has an invalid port number.") from None
    if parts.query or parts.fragment:
        raise ConfigError(
            f"API URL in {shown!r} has a query or fragment; pass the base URL only, such as http://127.0.0.1:8080/v1."
        )

    path = parts.path.rstrip("/")
    for endpoint in ("/chat/completions", "/completions", "/models"):
        if path.endswith(endpoint):
            raise ConfigError(
                f"API URL in {shown!r} ends in the endpoint {endpoint}; pass the base URL without it "
                f"(for example {parts.scheme}://{parts.netloc}{path[: -len(endpoint)]})."
            )
    return urllib.parse.urlunsplit((parts.scheme.lower(), parts.netloc, path, "", ""))


def _redact_url(text: str) -> str:
    """Replace ``user:password@`` in every URL of the text by ``***@``."""
    return re.sub(r"(https?://)[^/@\s]*@", r"\1***@", text, flags=re.IGNORECASE)


# The model.


class OpenAICompatibleModel:
    """A chat model behind an OpenAI-compatible server, implementing ``VisionLanguageModel`` and ``TextModel``.

    Each call sends its requests concurrently, at most ``max_in_flight`` at a time, and returns
    the responses in request order. A request is sent up to ``max_attempts`` times when the
    server returns HTTP 429, 500, 502, 503 or 504 or the connection drops. The wait before a
    retry is ``backoff_s``, then twice as long, and so on, or the server's Retry-After when
    longer, at most 30 s. ``timeout`` is the number of seconds a request may wait for the
    server without receiving data.
    """

    # Crops are scaled up to this side before sending. Servers resize images themselves, and
    # Qwen-style processors need at least 28 px.
    min_side = 28

    def __init__(
        self,
        model: str,
        base_url: str,
        *,
        role: str = "vlm",
        timeout: float = 600.0,
        max_in_flight: int = 4,
        max_attempts: int = 3,
        backoff_s: float = 0.5,
        api_key: Optional[str] = None,
    ) -> None:
        if max_in_flight < 1:
            raise ConfigError(f"max_in_flight must be at least 1, got {max_in_flight}.")
        if max_attempts < 1:
            raise ConfigError(f"max_attempts must be at least 1, got {max_attempts}.")
        if timeout <= 0:
            raise ConfigError(f"timeout must be more than 0 seconds, got {timeout}.")

        self.model = model
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.max_in_flight = max_in_flight
        self.max_attempts = max_attempts
        self.backoff_s = backoff_s
        self.info = ModelInfo(role=role, source=f"{model}@{self.base_url}", family=FAMILY, device="remote")
        self._api_key = api_key

    def __repr__(self) -> str:
        return f"OpenAICompatibleModel(model={self.model!r}, base_url={self.base_url!r}, role={self.info.role!r})"

    def describe(
        self,
        requests: Sequence[VisionRequest],
        settings: GenerationSettings,
        seed: Optional[int] = None,
        progress: Optional[ProgressCallback] = None,
    ) -> list[Generation]:
        """Generate one response per image request, in request order.

        Request ``i`` gets the seed ``seed + i``, so that repeated requests for several samples
        of one patch differ while a run stays reproducible on servers that honour ``seed``.
        """
        bodies = []
        for index, request in enumerate(requests):
            content = [
                {"type": "image_url", "image_url": {"url": image_data_url(request.image)}},
                {"type": "text", "text": request.prompt},
            ]
            messages = [{"role": "user", "content": content}]
            bodies.append(self._body(messages, settings, _request_seed(seed, index)))
        return self._run(bodies, [""] * len(bodies), settings, progress, label="describe")

    def chat(
        self,
        requests: Sequence[ChatRequest],
        settings: GenerationSettings,
        seed: Optional[int] = None,
        progress: Optional[ProgressCallback] = None,
    ) -> list[Generation]:
        """Generate one text response per request, in request order.

        A request's ``prefill`` is sent as a trailing assistant message, which many servers
        continue. ``raw`` and ``text`` start with the prefill exactly once, whether or not the
        server repeats it in its response. Request ``i`` gets the seed ``seed + i``.
        """
        bodies = []
        for index, request in enumerate(requests):
            messages = []
            if request.system:
                messages.append({"role": "system", "content": request.system})
            messages.append({"role": "user", "content": request.user})
            if request.prefill:
                messages.append({"role": "assistant", "content": request.prefill})
            bodies.append(self._body(messages, settings, _request_seed(seed, index)))
        prefills = [request.prefill for request in requests]
        return self._run(bodies, prefills, settings, progress, label="chat")

    def release(self) -> None:
        """Do nothing, because the model lives in the server's memory and this object stores only its address."""

    def list_models(self) -> list[str]:
        """Return the model ids that ``GET BASE_URL/models`` lists."""
        payload = self._send("GET", "/models", None, timeout=min(self.timeout, 30.0))
        entries = payload.get("data") if isinstance(payload, dict) else None
        if not isinstance(entries, list):
            raise APIRequestError(
                f"GET {self.base_url}/models returned JSON without a 'data' list, so it is not an "
                "OpenAI-compatible model list; check that the base URL ends in /v1.",
                f"{self.base_url}/models",
                200,
            )
        return [str(entry["id"]) for entry in entries if isinstance(entry, dict) and entry.get("id")]

    # Requests.

    def _body(self, messages: list[dict[str, Any]], settings: GenerationSettings, seed: Optional[int]) -> dict[str, Any]:
        # NOTE: repetition_penalty is not sent, because the OpenAI API has no such field and a
        # hosted API may reject unknown fields with HTTP 400.
        body: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "max_tokens": settings.max_new_tokens,
            "temperature": settings.temperature if settings.do_sample else 0.0,
            "top_p": settings.top_p if settings.do_sample else 1.0,
            "stream": False,
        }
        if seed is not None:
            body["seed"] = seed
        return body

    def _run(
        self,
        bodies: list[dict[str, Any]],
        prefills: list[str],
        settings: GenerationSettings,
        progress: Optional[ProgressCallback],
        label: str,
    ) -> list[Generation]:
        """Send the bodies concurrently and return the parsed responses in request order."""
        if not bodies:
            return []
        settings.validate(f"{label} generation")

        started = time.perf_counter()
        logger.info(
            "Sending %d %s requests to %s (model %s, %d at a time).",
            len(bodies),
            label,
            self.base_url,
            self.model,
            min(self.max_in_flight, len(bodies)),
        )

        results: list[Optional[Generation]] = [None] * len(bodies)
        executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=min(self.max_in_flight, len(bodies)), thread_name_prefix="patch-matters-api"
        )
        try:
            futures = {
                executor.submit(self._complete, body, prefill): index
                for index, (body, prefill) in enumerate(zip(bodies, prefills))
            }
            for future in concurrent.futures.as_completed(futures):
                results[futures[future]] = future.result()
                if progress is not None:
                    progress(label)
        finally:
            # On an error or a cancel raised by progress, requests not yet sent are dropped.
            executor.shutdown(wait=True, cancel_futures=True)

        generations = [result for result in results if result is not None]
        limited = sum(1 for generation in generations if generation.hit_token_limit)
        logger.info(
            "Received %d %s responses from %s in %.1f s (%d stopped at max_tokens=%d).",
            len(generations),
            label,
            self.base_url,
            time.perf_counter() - started,
            limited,
            settings.max_new_tokens,
        )
        return generations

    def _complete(self, body: dict[str, Any], prefill: str) -> Generation:
        payload = self._send("POST", "/chat/completions", body, timeout=self.timeout)
        return self._parse_completion(payload, prefill)

    def _parse_completion(self, payload: Any, prefill: str) -> Generation:
        """Turn one chat completion into a Generation, which is empty when the response has no text."""
        choices = payload.get("choices") if isinstance(payload, dict) else None
        choice = choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], dict) else None
        message = choice.get("message") if choice else None
        content = message.get("content") if isinstance(message, dict) else None
        finish_reason = choice.get("finish_reason") if choice else None

        if isinstance(content, list):
            # Some servers return content as a list of parts; the text parts are joined.
            content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
        if not isinstance(content, str):
            logger.warning(
                "Response from %s/chat/completions has no message text (finish_reason %r); using an empty response.",
                self.base_url,
                finish_reason,
            )
            return Generation(text="", raw=prefill, hit_token_limit=finish_reason == "length")

        raw = content if content.startswith(prefill) else prefill + content
        raw, repeated = cut_repetition(raw)
        if repeated:
            logger.warning(
                "A response from %s kept repeating one passage; it was cut after the passage's first copy.",
                self.base_url,
            )
        return Generation(
            text=clean_generated_text(raw, prefill=prefill),
            raw=raw,
            hit_token_limit=finish_reason == "length" and not repeated,
            repeated=repeated,
        )

    def _send(self, method: str, path: str, body: Optional[dict[str, Any]], timeout: float) -> Any:
        """Send one request with bounded retries and return its decoded JSON body."""
        url = self.base_url + path
        data = json.dumps(body).encode("utf-8") if body is not None else None

        for attempt in range(1, self.max_attempts + 1):
            request = urllib.request.Request(url, data=data, method=method, headers=self._headers(data is not None))
            try:
                with urllib.request.urlopen(request, timeout=timeout) as response:
                    status = response.status
                    raw_body = response.read()
                break
            except urllib.error.HTTPError as error:
                message = self._error_message(error)
                status = error.code
                retry_after = error.headers.get("Retry-After") if error.headers else None
                error.close()
                if status in (401, 403):
                    raise ModelLoadError(
                        f"{method} {url} was rejected with HTTP {status} ({message}); set the API key in the "
                        f"environment variable {API_KEY_VARIABLES[0]} (or {API_KEY_VARIABLES[1]})."
                    ) from None
                if status not in RETRY_STATUSES or attempt == self.max_attempts:
                    raise APIRequestError(
                        f"{method} {url} failed with HTTP {status}: {message}"
                        + (f" (after {attempt} attempts)" if attempt > 1 else ""),
                        url,
                        status,
                    ) from None
                self._wait_before_retry(method, url, f"HTTP {status} ({message})", attempt, retry_after)
            except (TimeoutError, socket.timeout):
                raise APIRequestError(
                    f"{method} {url} timed out after {timeout:g} s without a response; the server may be "
                    "overloaded, or raise the timeout for slow models.",
                    url,
                ) from None
            except (ConnectionError, http.client.HTTPException) as error:
                # A dropped connection or a cut-off response, as from a restarting server or proxy.
                if attempt == self.max_attempts:
                    raise APIRequestError(
                        f"{method} {url} failed: the server closed the connection ({type(error).__name__}) "
                        f"{attempt} times.",
                        url,
                    ) from None
                self._wait_before_retry(method, url, f"connection closed ({type(error).__name__})", attempt, None)
            except urllib.error.URLError as error:
                reason = error.reason
                if isinstance(reason, (TimeoutError, socket.timeout)):
                    raise APIRequestError(
                        f"{method} {url} timed out after {timeout:g} s while connecting; check that the "
                        "server is running and reachable.",
                        url,
                    ) from None
                if isinstance(reason, (ConnectionResetError, ConnectionAbortedError)) and attempt < self.max_attempts:
                    self._wait_before_retry(method, url, f"connection closed ({type(reason).__name__})", attempt, None)
                    continue
                raise APIRequestError(
                    f"{method} {url} failed: {self._redact(str(reason))}. Check that the server is running "
                    "and that the base URL is right.",
                    url,
                ) from None

        try:
            return json.loads(raw_body.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            start = self._redact(raw_body[:200].decode("utf-8", errors="replace"))
            raise APIRequestError(
                f"{method} {url} returned HTTP {status} with a body that is not valid JSON "
                f"(starts with {start!r}); check that the base URL points at an OpenAI-compatible API (often ending in /v1).",
                url,
                status,
            ) from None

    def _headers(self, with_body: bool) -> dict[str, str]:
        headers = {"Accept": "application/json", "User-Agent": "patch-matters"}
        if with_body:
            headers["Content-Type"] = "application/json"
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        return headers

    def _wait_before_retry(self, method: str, url: str, reason: str, attempt: int, retry_after: Optional[str]) -> None:
        delay = self.backoff_s * 2 ** (attempt - 1)
        if retry_after:
            try:
                delay = max(delay, float(retry_after))
            except ValueError:
                pass
        # Jitter keeps concurrent requests from retrying in lockstep.
        delay = min(delay * (1 + 0.1 * random.random()), _MAX_BACKOFF_S)
        logger.warning(
            "%s %s failed with %s; retrying in %.1f s (attempt %d of %d).",
            method,
            url,
            reason,
            delay,
            attempt + 1,
            self.max_attempts,
        )
        time.sleep(delay)

    def _error_message(self, error: urllib.error.HTTPError) -> str:
        """Return ``error.message`` of an OpenAI error body, else the start of the body."""
        try:
            text = error.read().decode("utf-8", errors="replace")
        except OSError:
            text = ""
        message = text.strip()
        try:
            payload = json.loads(text)
        except json.JSONDecodeError:
            payload = None
        if isinstance(payload, dict):
            detail = payload.get("error", payload.get("message", payload.get("detail")))
            if isinstance(detail, dict):
                detail = detail.get("message", detail)
            if detail:
                message = str(detail)
        message = message or error.reason or "no message"
        return self._redact(str(message))[:_MAX_MESSAGE_CHARS]

    def _redact(self, text: str) -> str:
        """Remove the API key from text that came from the server, in case a server repeats it."""
        if self._api_key:
            text = text.replace(self._api_key, "***")
        return text


def _request_seed(seed: Optional[int], index: int) -> Optional[int]:
    return None if seed is None else seed + index


def image_data_url(image: Image.Image, quality: int = 95) -> str:
    """Encode an image as a ``data:image/jpeg;base64,...`` URL, converting it to RGB first."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def api_key_from_environment(environ: Optional[dict[str, str]] = None) -> Optional[str]:
    """Return the API key of PATCH_MATTERS_API_KEY, else OPENAI_API_KEY, else None."""
    environ = os.environ if environ is None else environ
    for name in API_KEY_VARIABLES:
        value = environ.get(name, "").strip()
        if value:
            return value
    return None


def load_api_model(
    spec: str,
    role: str = "vlm",
    timeout: float = 600.0,
    max_in_flight: int = 4,
    max_attempts: int = 3,
    backoff_s: float = 0.5,
) -> OpenAICompatibleModel:
    """Connect to the server of ``MODEL@BASE_URL`` (or a bare base URL) and return its model.

    ``GET BASE_URL/models`` checks that the server is running and, for a bare base URL, gives
    the model (the first listed). A named model that the list lacks is used anyway with a
    warning, because some servers list aliases only. Raises ConfigError for a malformed spec
    and ModelLoadError when the server is down, rejects the key or lists no model.
    """
    model, base_url = parse_api_spec(spec)
    started = time.perf_counter()
    logger.info("Connecting to the %s model %s at %s.", role, model or "(first listed)", base_url)

    client = OpenAICompatibleModel(
        model or "",
        base_url,
        role=role,
        timeout=timeout,
        max_in_flight=max_in_flight,
        max_attempts=max_attempts,
        backoff_s=backoff_s,
        api_key=api_key_from_environment(),
    )

    try:
        listed = client.list_models()
    except APIRequestError as error:
        listed = _handle_listing_failure(error, model, base_url)

    if model is None:
        if not listed:
            raise ModelLoadError(
                f"The server at {base_url} lists no models; load a model in the server, or name it "
                "as MODEL@BASE_URL."
            )
        model = listed[0]
        logger.info("Using %s, the first of %d models that %s lists.", model, len(listed), base_url)
    elif listed is not None and model not in listed:
        logger.warning(
            "Model %s is not among the %d models that %s lists (%s); sending requests for it anyway.",
            model,
            len(listed),
            base_url,
            ", ".join(listed[:5]) + (" ..." if len(listed) > 5 else ""),
        )

    client.model = model
    client.info = ModelInfo(role=role, source=f"{model}@{base_url}", family=FAMILY, device="remote")
    logger.info("Connected to %s at %s in %.1f s.", model, base_url, time.perf_counter() - started)
    return client


def _handle_listing_failure(error: APIRequestError, model: Optional[str], base_url: str) -> Optional[list[str]]:
    """Raise ModelLoadError for a down server; return None when a named model can do without the list."""
    if error.status is None:
        raise ModelLoadError(
            f"Cannot reach the model server at {base_url}: {error} The server must be running before "
            "the model is loaded."
        ) from None
    if model is not None and error.status in (404, 405):
        logger.warning(
            "%s/models returned HTTP %d, so the model %s cannot be checked; sending requests for it anyway.",
            base_url,
            error.status,
            model,
        )
        return None
    hint = " Name the model as MODEL@BASE_URL, or check that the base URL ends in /v1." if model is None else ""
    raise ModelLoadError(f"Cannot list the models of the server at {base_url}: {error}{hint}") from None

