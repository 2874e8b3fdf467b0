"""Request accounting as pure ASGI middleware (cheaper than BaseHTTPMiddleware on the hot path): a request
id (taken from `x-request-id` or made), a Server-Timing header with db, backend and total, the request
size limit, counted on the bytes as they arrive (a chunked body declares no length), the request metrics
and the access log's line (service/logs.py)."""

from __future__ import annotations

import random
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import metrics, observe
from service.api.errors import convstate_error_response
from service.errors import RequestTooLarge
from service.logs import AccessLog


class RequestAccounting:
    def __init__(self, app: ASGIApp, max_request_bytes: int, access: AccessLog) -> None:
        self.app = app
        self.max_request_bytes = max_request_bytes
        self.access = access

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            await self._websocket(scope, receive, send)
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _request_id(scope)
        scope.setdefault("state", {})["request_id"] = request_id
        stats = observe.RequestStats(request_id)
        token = observe.current.set(stats)

        status = 500

        async def send_with_headers(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", request_id.encode()))
                headers.append((b"server-timing", stats.server_timing().encode()))
                message["headers"] = headers
            await send(message)

        received = 0

        async def receive_counted() -> Message:
            """Raises RequestTooLarge once the body passes the limit; the route reading the body lets it
            reach the error handlers, which answer 413."""
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_request_bytes:
                    raise RequestTooLarge(self.max_request_bytes)
            return message

        try:
            length = _header(scope, b"content-length")
            if length is not None and length.isdigit() and int(length) > self.max_request_bytes:
                # Declared too large: answered without reading a byte of it.
                too_large = convstate_error_response(RequestTooLarge(self.max_request_bytes))
                await too_large(scope, receive, send_with_headers)
            else:
                await self.app(scope, receive_counted, send_with_headers)
        finally:
            observe.current.reset(token)
            route = scope.get("route")
            path = getattr(route, "path", "unmatched")
            method = scope["method"]
            metrics.labelled(metrics.requests, method, path, str(status)).inc()
            elapsed = time.perf_counter() - stats.started
            metrics.labelled(metrics.request_seconds, method, path).observe(elapsed)
            metrics.db_seconds.observe(stats.db_seconds)
            metrics.backend_seconds.observe(stats.backend_seconds)
            self.access.add(method, scope["path"], status, elapsed, request_id, scope.get("client"))

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A line when the connection ends, with the status of its handshake: 101 when accepted, 403 when
        closed before (as the server answers then). Each of its turns has a request id of its own
        (api/responses.py)."""
        started = time.perf_counter()
        status = 403

        async def send_noting_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "websocket.accept":
                status = 101
            await send(message)

        try:
            await self.app(scope, receive, send_noting_status)
        finally:
            elapsed = time.perf_counter() - started
            self.access.add(
                "WEBSOCKET", scope["path"], status, elapsed, _request_id(scope), scope.get("client")
            )


def new_request_id() -> str:
    # A request id only has to be unique, not unguessable: no read of the system's randomness.
    return f"req_{random.getrandbits(128):032x}"


def _request_id(scope: Scope) -> str:
    return _header(scope, b"x-request-id") or new_request_id()


def _header(scope: Scope, name: bytes) -> str | None:
    headers: Any = scope.get("headers") or []
    for key, value in headers:
        if key == name:
            text: str = value.decode("latin-1")
            return text[:128]
    return None
