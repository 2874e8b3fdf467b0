"""Client for a vLLM-compatible backend: chat completions, /tokenize, /v1/models (+ the prompt_cache
extension described in docs/backend-protocol.md).

Bodies are serialized once with orjson and posted as bytes over kept-alive connections of a minimal
HTTP/1.1 transport (http.py; measured: httpx's pool scans every pooled connection on each request, a
third of a turn's client CPU, and aiohttp's request machinery cost twice the transport's). Transient
failures (connect errors, 429/502/503) are retried with jittered backoff inside a total deadline; a typed
cache miss (409 prompt_cache_miss) is raised as BackendMiss for the pipeline to fall back on, never
retried here. A request waits at most backend_pool_timeout for one of backend_max_connections, then
gets a 503: a saturated backend never queues callers without bound. Client-facing errors name neither
the backend's address nor the transport's exception; the log line (with the request id) has both.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from service import observe
from service.backends.http import Headers, Pool, Response, TransportError, Unreachable
from service.config import Settings
from service.domain.fingerprint import BackendModelInfo
from service.errors import (
    BackendTimeout,
    BackendUnavailable,
    ContextLengthExceeded,
    ConvstateError,
    InvalidRequest,
    ServiceUnavailable,
)
from service.observe import in_backend

log = logging.getLogger("convstate.backend")

_TRANSIENT_STATUS = frozenset({429, 502, 503})


def _failed(message: str, detail: str, *, status: int = 502) -> BackendUnavailable:
    """`message` for the client; `detail` (addresses, exception text, the backend's words) for the log."""
    log.warning("%s %s", message, detail)
    return BackendUnavailable(message, status=status)


class BackendMiss(Exception):
    """The backend refused a cache reference (HTTP 409, type prompt_cache_miss)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


class _TransientStatus(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class PromptCacheHandle:
    ref: str
    epoch: str
    tokens: int
    safe_boundary: bool
    safe_tokens: int
    prefix_hash: str
    covers_output: bool
    expires_at: float
    fingerprint: str | None
    reused_tokens: int


@dataclass(slots=True)
class ChatReply:
    content: str | None
    reasoning: str | None
    tool_calls: list[dict[str, Any]]
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    reasoning_tokens: int
    prompt_digest: str | None
    handle: PromptCacheHandle | None
    bytes_sent: int
    logprobs: list[dict[str, Any]] = field(default_factory=list)
    cache_write_tokens: int = 0
    # What the backend generated from and generated (`return_token_ids`), when it reported them. After a
    # prompt_cache ref the prompt's ids start at `prompt_token_ids_start`: the ones before are the
    # handle's, which the turn that registered it reported.
    prompt_token_ids: list[int] | None = None
    output_token_ids: list[int] | None = None
    prompt_token_ids_start: int = 0
    # llm-d's session token: names the replica that served this turn (its KV lives there).
    session_token: str | None = None


SESSION_HEADER = "x-session-token"
SESSION_COOKIE = "llm-d-session"


def reply_session_token(headers: Headers) -> str | None:
    """llm-d's session token from a reply: the `x-session-token` header (earlier llm-d) or the
    `llm-d-session` cookie (current llm-d's session-affinity scorer)."""
    if token := headers.get(SESSION_HEADER):
        return token
    for cookie in headers.getall("set-cookie"):
        name, _, rest = cookie.partition("=")
        if name.strip() == SESSION_COOKIE:
            return rest.split(";", 1)[0].strip() or None
    return None


def _token_ids(value: Any) -> list[int] | None:
    # Exact types (a bool is no id), looked at in C: a reply's hundreds of ids cost a tenth of a loop's.
    if isinstance(value, list) and set(map(type, value)) <= {int}:
        return value
    return None


def _ids_start(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def parse_handle(data: Any) -> PromptCacheHandle | None:
    """The prompt_cache object of a reply; None when absent or malformed (fail closed: no reuse)."""
    if not isinstance(data, dict):
        return None
    try:
        return PromptCacheHandle(
            ref=str(data["ref"]),
            epoch=str(data["epoch"]),
            tokens=int(data["tokens"]),
            safe_boundary=bool(data["safe_boundary"]),
            safe_tokens=int(data["safe_tokens"]),
            prefix_hash=str(data["prefix_hash"]),
            covers_output=bool(data["covers_output"]),
            expires_at=float(data["expires_at"]),
            fingerprint=data.get("fingerprint"),
            reused_tokens=int(data.get("reused_tokens") or 0),
        )
    except (KeyError, TypeError, ValueError):
        return None


def usage_counts(usage: dict[str, Any] | None) -> tuple[int, int, int, int, int]:
    """(prompt, completion, cached, cache-write, reasoning) tokens from an OpenAI/vLLM usage object;
    vLLM reports the prompt tokens it wrote to its prefix cache as `created_cache_tokens`."""
    usage = usage or {}
    prompt_details = usage.get("prompt_tokens_details") or {}
    completion_details = usage.get("completion_tokens_details") or {}
    return (
        int(usage.get("prompt_tokens") or 0),
        int(usage.get("completion_tokens") or 0),
        int(prompt_details.get("cached_tokens") or 0),
        int(prompt_details.get("created_cache_tokens") or 0),
        int(completion_details.get("reasoning_tokens") or 0),
    )


def _model_info(card: dict[str, Any]) -> BackendModelInfo:
    extension = card.get("prompt_cache") or {}
    parts = extension.get("fingerprint_parts") or {}
    block_size = parts.get("block_size")
    return BackendModelInfo(
        model=str(card.get("id")),
        # Only the extension vouches for the weights: a path (vLLM's `root`) can be reloaded with other
        # weights under the same name, so without a revision the model part stays unknown.
        revision=parts.get("revision"),
        tokenizer=parts.get("tokenizer"),
        renderer=parts.get("renderer"),
        chat_template=parts.get("chat_template"),
        # An explicit null is "no adapter"; a missing key is unknown (an adapter may be reloaded under
        # the same name, so only its reported identity counts).
        lora=(str(parts["lora"]) if parts["lora"] is not None else "none") if "lora" in parts else None,
        block_size=int(block_size) if block_size is not None else None,
        epoch=extension.get("epoch"),
        backend_fingerprint=extension.get("fingerprint"),
        max_model_len=card.get("max_model_len"),
        seeds=extension.get("seed") is True,
    )


@dataclass(frozen=True, slots=True)
class _Reply:
    """A backend response read whole."""

    status: int
    headers: Headers
    body: bytes


@dataclass(frozen=True, slots=True)
class _ErrorBody:
    message: str
    type: str | None = None
    param: str | None = None
    # OpenAI's codes are strings or null; vLLM's (the HTTP status as an integer) are dropped.
    code: str | None = None


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _error_body(status: int, body: bytes) -> _ErrorBody:
    """An error body in OpenAI's, vLLM's or llama.cpp's shape, or neither."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return _ErrorBody(body[:500].decode(errors="replace") or f"HTTP {status}")
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict):
        return _ErrorBody(
            str(error.get("message") or data),
            _text(error.get("type")),
            _text(error.get("param")),
            _text(error.get("code")),
        )
    if isinstance(data, dict) and "message" in data:
        return _ErrorBody(str(data["message"]), _text(data.get("type")))
    return _ErrorBody(str(data)[:500])


# A prompt over the context window, as servers word it: vLLM ("This model's maximum context length is N
# tokens. However, your prompt contains M input tokens", older "You passed N input tokens ... the model's
# context length is only K tokens", "'max_tokens' ... is too large: ... maximum context length"),
# llama.cpp (type exceed_context_size_error; "request (N tokens) exceeds the available context size",
# "input (N tokens) is larger than the max context size") and OpenAI (code context_length_exceeded).
_CONTEXT_LENGTH = re.compile(r"maximum context length|context length is only|context size", re.IGNORECASE)


def _is_context_length(error: _ErrorBody) -> bool:
    return (
        error.type == "exceed_context_size_error"
        or error.code == "context_length_exceeded"
        or _CONTEXT_LENGTH.search(error.message) is not None
    )


def backend_error(status: int, body: bytes) -> BackendMiss | ConvstateError:
    """The typed error for a backend's error reply (status >= 400)."""
    error = _error_body(status, body)
    message = error.message
    if status == 409 and error.type == "prompt_cache_miss":
        return BackendMiss(error.code or "unknown", message)
    if status in (401, 403):
        # The service's credentials, not the client's request: the operator's problem.
        return _failed(
            "The model backend refused this service's credentials; the service operator must fix its "
            "backend API key.",
            f"HTTP {status}: {message}",
        )
    if status == 404:
        return InvalidRequest(
            f"The model backend does not serve this model: {message}", param="model", code="model_not_found"
        )
    if status == 400 and _is_context_length(error):
        return ContextLengthExceeded(f"The input is too long for the model: {message}")
    if status < 500:
        return InvalidRequest(f"The model backend rejected the request: {message}", code=error.code)
    return _failed(f"The model backend failed (HTTP {status}).", message)


@dataclass(slots=True)
class ChunkDelta:
    """What one streamed chunk adds: reasoning text, answer text, tool-call pieces (index, id, name, args)."""

    reasoning: str = ""
    content: str = ""
    tool_calls: list[tuple[int, str | None, str | None, str]] = field(default_factory=list)
    logprobs: list[dict[str, Any]] = field(default_factory=list)


class EventStream:
    """An open streamed reply of the backend: `events()` yields its chunks as parsed JSON; closing it
    (which the iteration does when it ends) gives its connection slot back."""

    def __init__(
        self,
        response: Response,
        bytes_sent: int,
        started: float,
        release_slot: Callable[[], None],
    ) -> None:
        self._response = response
        self._release_slot: Callable[[], None] | None = release_slot
        self._bytes_sent, self._started = bytes_sent, started

    @property
    def bytes_sent(self) -> int:
        return self._bytes_sent

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        rest = b""
        try:
            async for data in self._response.chunks():
                # Server-sent events, one per `data:` line; a line may span chunks, and a last one
                # without its newline is an unfinished event, dropped as the SSE specification says.
                *lines, rest = (rest + data).split(b"\n")
                for line in lines:
                    if not line.startswith(b"data:"):
                        continue
                    payload = line[5:].strip()
                    if payload == b"[DONE]":
                        return
                    chunk = orjson.loads(payload)
                    error = chunk.get("error")
                    if isinstance(error, dict):
                        # vLLM reports a failure inside generation in band: an error object, no chunk.
                        raise _failed("The model backend failed mid-stream.", str(error.get("message")))
                    yield chunk
        except TimeoutError:
            raise BackendTimeout("The model backend stopped answering mid-stream.") from None
        except TransportError as exc:
            raise _failed("The model backend failed mid-stream.", repr(exc)) from None
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        self._response.release()
        if self._release_slot is not None:
            self._release_slot()
            self._release_slot = None
        observed = observe.current.get()
        if observed is not None and self._started:
            observed.backend_seconds += time.perf_counter() - self._started
            self._started = 0.0


class ChatStream(EventStream):
    """An open streaming chat completion: iterate for deltas, then `reply()` for the totals."""

    def __init__(
        self,
        client: BackendClient,
        model: str,
        response: Response,
        bytes_sent: int,
        started: float,
        release_slot: Callable[[], None],
    ) -> None:
        super().__init__(response, bytes_sent, started, release_slot)
        self._client, self._model = client, model
        self._finish_reason: str | None = None
        self._usage: dict[str, Any] | None = None
        self._digest: str | None = response.headers.get("x-prompt-digest")
        self._handle: PromptCacheHandle | None = None
        self._text: list[str] = []
        self._reasoning: list[str] = []
        self._calls: dict[int, dict[str, Any]] = {}
        self._prompt_ids: list[int] | None = None
        self._prompt_ids_start = 0
        self._output_ids: list[int] | None = None

    async def deltas(self) -> AsyncIterator[ChunkDelta]:
        async for chunk in self.events():
            yield self._feed(chunk)

    def _feed(self, chunk: dict[str, Any]) -> ChunkDelta:
        delta = ChunkDelta()
        if chunk.get("usage"):
            self._usage = chunk["usage"]
        self._digest = chunk.get("prompt_digest") or self._digest
        if chunk.get("prompt_cache"):
            self._handle = parse_handle(chunk["prompt_cache"])
        # return_token_ids: the prompt's ids ride on the first chunk, the output's on each chunk.
        if (prompt_ids := _token_ids(chunk.get("prompt_token_ids"))) is not None:
            self._prompt_ids = prompt_ids
            self._prompt_ids_start = _ids_start(chunk.get("prompt_token_ids_start"))
        for choice in chunk.get("choices") or []:
            if (ids := _token_ids(choice.get("token_ids"))) is not None:
                self._output_ids = [*(self._output_ids or []), *ids]
            self._finish_reason = choice.get("finish_reason") or self._finish_reason
            piece = choice.get("delta") or {}
            delta.reasoning += piece.get("reasoning_content") or piece.get("reasoning") or ""
            delta.content += piece.get("content") or ""
            for call in piece.get("tool_calls") or []:
                function = call.get("function") or {}
                delta.tool_calls.append(
                    (
                        int(call.get("index") or 0),
                        call.get("id"),
                        function.get("name"),
                        function.get("arguments") or "",
                    )
                )
            delta.logprobs.extend((choice.get("logprobs") or {}).get("content") or [])
        self._reasoning.append(delta.reasoning)
        self._text.append(delta.content)
        for index, call_id, name, arguments in delta.tool_calls:
            call = self._calls.setdefault(index, {"id": call_id, "function": {"name": name, "arguments": ""}})
            call["id"] = call["id"] or call_id
            call["function"]["name"] = call["function"]["name"] or name
            call["function"]["arguments"] += arguments
        return delta

    def reply(self) -> ChatReply:
        prompt, completion, cached, cache_write, reasoning_tokens = usage_counts(self._usage)
        self._client._note_epoch(self._model, self._handle)
        return ChatReply(
            content="".join(self._text),
            reasoning="".join(self._reasoning) or None,
            tool_calls=[self._calls[index] for index in sorted(self._calls)],
            finish_reason=self._finish_reason,
            prompt_tokens=prompt,
            completion_tokens=completion,
            cached_tokens=cached,
            reasoning_tokens=reasoning_tokens,
            prompt_digest=self._digest,
            handle=self._handle,
            bytes_sent=self._bytes_sent,
            cache_write_tokens=cache_write,
            prompt_token_ids=self._prompt_ids,
            output_token_ids=self._output_ids,
            prompt_token_ids_start=self._prompt_ids_start,
            session_token=reply_session_token(self._response.headers),
        )


class BackendClient:
    def __init__(self, settings: Settings) -> None:
        self.base_url = settings.backend_url
        self._settings = settings
        self._pool = Pool(
            settings.backend_url,
            connect_timeout=settings.backend_connect_timeout,
            read_timeout=settings.backend_timeout,
            # Below the 5 s uvicorn (and so vLLM) keeps an idle connection: we never reuse one the
            # server is closing.
            keepalive=2.0,
            headers=_auth_headers(settings),
        )
        self._models: dict[str, BackendModelInfo] = {}
        self._models_fetched_at = float("-inf")
        self._models_lock = asyncio.Lock()
        self._slots = asyncio.Semaphore(settings.backend_max_connections)
        self._models_status = "unknown"

    async def aclose(self) -> None:
        self._pool.close()

    async def _acquire(self) -> None:
        """Take one of the backend_max_connections slots, waiting at most backend_pool_timeout."""
        if not self._slots.locked():
            # A free slot is taken without suspending: no deadline timer to set up and cancel.
            await self._slots.acquire()
            return
        try:
            async with asyncio.timeout(self._settings.backend_pool_timeout):
                await self._slots.acquire()
        except TimeoutError:
            log.warning(
                "no backend connection free within %.1f s (%d in use)",
                self._settings.backend_pool_timeout,
                self._settings.backend_max_connections,
            )
            raise ServiceUnavailable(
                "The model backend is busy; retry shortly.", code="backend_busy"
            ) from None

    async def _send(self, path: str, body: bytes, headers: dict[str, str]) -> Response:
        """POST with bounded, jittered retries on transient failures; transport errors become typed ones.
        The caller holds a slot, and reads (or streams) and releases the response."""
        try:
            return await self._send_retrying(path, body, headers)
        except _TransientStatus as exc:
            raise _failed(
                f"The model backend is unavailable (HTTP {exc.status}).",
                f"{self.base_url}{path}: {exc}",
                status=503 if exc.status in (429, 503) else 502,
            ) from None
        except Unreachable as exc:
            raise _failed("The model backend is unreachable.", f"{self.base_url}{path}: {exc!r}") from None
        except TimeoutError:
            raise BackendTimeout("The model backend did not answer in time.") from None
        except TransportError as exc:
            raise _failed("The model backend failed.", f"{self.base_url}{path}: {exc!r}") from None

    async def _send_retrying(self, path: str, body: bytes, headers: dict[str, str]) -> Response:
        """Up to backend_retry_attempts tries while backend_retry_deadline has not passed, a transient
        failure followed by a random wait of up to 50 ms, doubling each time, at most 1 s ("full jitter":
        retries from many turns do not arrive together). A plain loop: a retry library's bookkeeping
        cost more CPU on every call than the call's own retry logic."""
        settings = self._settings
        give_up_at = time.monotonic() + settings.backend_retry_deadline
        attempt = 1
        while True:
            try:
                response = await self._pool.request(b"POST", path, body, headers)
                if response.status in _TRANSIENT_STATUS:
                    try:
                        detail = _error_body(response.status, await response.read()).message
                    finally:
                        response.release()
                    raise _TransientStatus(response.status, detail)
                return response
            except (Unreachable, _TransientStatus):
                if attempt >= settings.backend_retry_attempts or time.monotonic() >= give_up_at:
                    raise
            await asyncio.sleep(random.uniform(0, min(1.0, 0.05 * 2 ** (attempt - 1))))
            attempt += 1

    async def _post(self, path: str, body: bytes, headers: dict[str, str]) -> _Reply:
        await self._acquire()
        try:
            response = await self._send(path, body, headers)
            try:
                return _Reply(response.status, response.headers, await response.read())
            except TimeoutError:
                raise BackendTimeout("The model backend did not answer in time.") from None
            except TransportError as exc:
                raise _failed("The model backend failed.", f"{self.base_url}{path}: {exc!r}") from None
            finally:
                response.release()
        finally:
            self._slots.release()

    def _raise_for_status(self, status: int, body: bytes) -> None:
        if status < 400:
            return
        error = backend_error(status, body)
        if isinstance(error, BackendMiss):
            # A refused handle often means a restart: learn the new epoch on the next decision.
            self._models_fetched_at = float("-inf")
        raise error

    async def chat(self, body: dict[str, Any], headers: dict[str, str] | None = None) -> ChatReply:
        payload = orjson.dumps(body)
        with in_backend():
            response = await self._post("/v1/chat/completions", payload, headers or {})
        self._raise_for_status(response.status, response.body)
        data = orjson.loads(response.body)
        try:
            choice = data["choices"][0]
            message = choice.get("message") or {}
        except (KeyError, IndexError, TypeError):
            raise BackendUnavailable("The model backend returned a malformed completion.") from None
        prompt, completion, cached, cache_write, reasoning_tokens = usage_counts(data.get("usage"))
        logprobs = (choice.get("logprobs") or {}).get("content") or []
        handle = parse_handle(data.get("prompt_cache"))
        self._note_epoch(str(body.get("model")), handle)
        return ChatReply(
            content=message.get("content"),
            reasoning=message.get("reasoning_content") or message.get("reasoning"),
            tool_calls=list(message.get("tool_calls") or []),
            finish_reason=choice.get("finish_reason"),
            prompt_tokens=prompt,
            completion_tokens=completion,
            cached_tokens=cached,
            reasoning_tokens=reasoning_tokens,
            prompt_digest=data.get("prompt_digest") or response.headers.get("x-prompt-digest"),
            handle=handle,
            bytes_sent=len(payload),
            logprobs=list(logprobs),
            cache_write_tokens=cache_write,
            prompt_token_ids=_token_ids(data.get("prompt_token_ids")),
            output_token_ids=_token_ids(choice.get("token_ids")),
            prompt_token_ids_start=_ids_start(data.get("prompt_token_ids_start")),
            session_token=reply_session_token(response.headers),
        )

    async def open_chat_stream(
        self, body: dict[str, Any], headers: dict[str, str] | None = None
    ) -> ChatStream:
        """Send a streaming completion and check its status; a typed miss raises here, before any delta."""
        payload = orjson.dumps({**body, "stream": True, "stream_options": {"include_usage": True}})
        started = time.perf_counter()
        response = await self._open_stream("/v1/chat/completions", payload, headers or {})
        # The stream gives the slot back when it is closed.
        return ChatStream(self, str(body.get("model")), response, len(payload), started, self._slots.release)

    async def _open_stream(self, path: str, payload: bytes, headers: dict[str, str]) -> Response:
        """Take a slot and send; the error of a refused request raises here, with the slot given back."""
        await self._acquire()
        try:
            response = await self._send(path, payload, headers)
            if response.status >= 400:
                try:
                    error_body = await response.read()
                finally:
                    response.release()
                self._raise_for_status(response.status, error_body)
        except BaseException:
            self._slots.release()
            raise
        return response

    async def forward(
        self, path: str, body: dict[str, Any], headers: dict[str, str]
    ) -> tuple[dict[str, Any], int]:
        """POST a client's OpenAI request as it is (the proxy's chat completions and completions): the
        backend's JSON reply and the bytes sent."""
        payload = orjson.dumps(body)
        with in_backend():
            response = await self._post(path, payload, headers)
        self._raise_for_status(response.status, response.body)
        try:
            data = orjson.loads(response.body)
        except orjson.JSONDecodeError:
            raise BackendUnavailable("The model backend returned a malformed reply.") from None
        if not isinstance(data, dict):
            raise BackendUnavailable("The model backend returned a malformed reply.")
        return data, len(payload)

    async def forward_stream(self, path: str, body: dict[str, Any], headers: dict[str, str]) -> EventStream:
        """The streamed form of `forward`: the request is sent as it is (with `stream` set by the caller)."""
        payload = orjson.dumps(body)
        started = time.perf_counter()
        response = await self._open_stream(path, payload, headers)
        return EventStream(response, len(payload), started, self._slots.release)

    def _note_epoch(self, model: str, handle: PromptCacheHandle | None) -> None:
        """A handle from an epoch the cached /v1/models answer does not know: that answer is stale."""
        known = self._models.get(model)
        if handle is not None and known is not None and known.epoch != handle.epoch:
            self._models_fetched_at = float("-inf")

    async def tokenize_chat(self, body: dict[str, Any]) -> list[int]:
        with in_backend():
            response = await self._post("/tokenize", orjson.dumps(body), {})
        self._raise_for_status(response.status, response.body)
        return list(orjson.loads(response.body)["tokens"])

    async def detokenize(self, model: str, token_ids: list[int]) -> str:
        with in_backend():
            body = orjson.dumps({"model": model, "tokens": token_ids})
            response = await self._post("/detokenize", body, {})
        self._raise_for_status(response.status, response.body)
        return str(orjson.loads(response.body)["prompt"])

    async def model_info(self, model: str) -> BackendModelInfo | None:
        """The model's card from a /v1/models answer at most backend_info_ttl old; None if not served."""
        if time.monotonic() - self._models_fetched_at > self._settings.backend_info_ttl:
            async with self._models_lock:
                if time.monotonic() - self._models_fetched_at > self._settings.backend_info_ttl:
                    await self._refresh_models()
        return self._models.get(model)

    async def status(self) -> str:
        """Ask /v1/models now: "ok", or in a word why it does not answer (for /readyz, so at most half a
        second: a hung backend must not make the probe itself time out; kubelet's default is 1 s)."""
        await self._refresh_models(min(self._settings.backend_connect_timeout, 0.5))
        return self._models_status

    async def _refresh_models(self, seconds: float | None = None) -> None:
        cards: list[Any] = []
        try:
            async with asyncio.timeout(seconds or self._settings.backend_connect_timeout):
                response = await self._pool.request(b"GET", "/v1/models")
                try:
                    body = await response.read()
                finally:
                    response.release()
            if response.status in (401, 403):
                self._models_status = "unauthorized"
            elif response.status >= 400:
                self._models_status = f"http_{response.status}"
            else:
                cards = orjson.loads(body).get("data") or []
                self._models_status = "ok"
        except (Unreachable, TransportError, TimeoutError):
            self._models_status = "unreachable"
        except (ValueError, AttributeError):
            self._models_status = "malformed"
        # Unknown epoch and fingerprint when it failed: every decision fails closed to the full path.
        self._models = {str(card.get("id")): _model_info(card) for card in cards if isinstance(card, dict)}
        self._models_fetched_at = time.monotonic()


def _auth_headers(settings: Settings) -> dict[str, str]:
    key = settings.backend_api_key.get_secret_value() if settings.backend_api_key else ""
    return {"authorization": f"Bearer {key}"} if key else {}
