"""The HTTP/1.1 transport of the backend client: kept-alive connections on asyncio protocols, replies
parsed by httptools (uvicorn's parser). It does only what the backend calls need: send a request whose
body is already bytes, then read the reply whole or as it arrives. A call costs under half of
aiohttp's CPU, which built a request object, a payload, a stream reader and timers on every call.

No limit of its own: the backend client holds one of its slots around every call but the model
list's (a GET about once a second), so the connections in use stay within them, give or take that
GET. Idle connections are reused newest first and never after `keepalive` seconds (below the server's
own, so the server is never closing the one reused); older ones are closed as calls return them, or by
the server. No Accept-Encoding is sent, so replies come uncompressed. No cookie is kept: llm-d's
session cookie names the replica of one lineage, and kept it would go out with every other turn.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import AsyncIterator
from typing import cast
from urllib.parse import urlsplit

import httptools

# A streamed reply not yet read past this many bytes stops reading from the socket until it is.
_READ_AHEAD = 1 << 18


class Unreachable(Exception):
    """The request reached no server that answered: the connection could not be made in time, or closed
    before a reply began. Sending it again is safe (a generation's only side effect is a handle nobody
    will use)."""


class TransportError(Exception):
    """The connection failed or carried a malformed reply after the reply began."""


class Headers:
    """A reply's headers, names lower-cased."""

    __slots__ = ("_pairs",)

    def __init__(self, pairs: list[tuple[str, str]]) -> None:
        self._pairs = pairs

    def get(self, name: str) -> str | None:
        for key, value in self._pairs:
            if key == name:
                return value
        return None

    def getall(self, name: str) -> list[str]:
        return [value for key, value in self._pairs if key == name]


class _Connection(asyncio.Protocol):
    """One connection and the reply in flight on it; the parser's callbacks fill the reply in."""

    def __init__(self, loop: asyncio.AbstractEventLoop, read_timeout: float) -> None:
        self._loop = loop
        self._read_timeout = read_timeout
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self.idle_in: Pool | None = None  # the pool it waits in while idle
        self.idle_since = 0.0
        self.closed = False
        # The reply in flight.
        self._busy = False
        self._status = 0
        self._headers: list[tuple[str, str]] = []
        self._head = False
        self._keep_alive = False
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._complete = False
        self._error: Exception | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False
        # Read timeout without a timer moved per chunk: one timer per reply, which on firing looks at
        # when data last came and sets itself again for the rest.
        self._last_data = 0.0
        self._timer: asyncio.TimerHandle | None = None

    # --- asyncio.Protocol ---

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's are not its subclasses

    def data_received(self, data: bytes) -> None:
        if not self._busy:
            # Bytes no request asked for (an idle connection's timeout reply): nothing can follow them.
            self.close()
            return
        self._last_data = self._loop.time()
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(TransportError(f"malformed reply: {exc}"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.idle_in is not None:
            self.idle_in.forget(self)
        if not self._busy or self._complete:
            return
        if not self._head:
            self._fail(Unreachable(f"connection closed before a reply: {exc!r}"))
        elif not self._framed():
            # A body without a length or chunks ends when the connection does.
            self.on_message_complete()
        else:
            self._fail(TransportError(f"connection closed mid-reply: {exc!r}"))

    # --- httptools callbacks ---

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.decode("latin-1").lower(), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        self._status = self._parser.get_status_code()
        # Known only now: the parser forgets it once the message is complete.
        self._keep_alive = self._parser.should_keep_alive()
        self._head = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > _READ_AHEAD and not self._paused and self._transport is not None:
            self._paused = True
            self._transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        self._complete = True
        self._cancel_timer()
        self._wake()

    # --- the reply ---

    def _framed(self) -> bool:
        headers = Headers(self._headers)
        return headers.get("content-length") is not None or headers.get("transfer-encoding") is not None

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, error: Exception) -> None:
        if self._error is None:
            self._error = error
        self._cancel_timer()
        self._wake()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _check_read(self) -> None:
        self._timer = None
        now = self._loop.time()
        if self._paused:  # the reader is behind, not the server
            self._last_data = now
        due = self._last_data + self._read_timeout
        if now < due:
            self._timer = self._loop.call_at(due, self._check_read)
            return
        self._fail(TimeoutError())
        self.close()

    async def _progress(self) -> None:
        """Wait for the parser (or the connection, or the timer) to move the reply on."""
        if self._error is not None:
            raise self._error
        self._waiter = self._loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None
        if self._error is not None:
            raise self._error

    async def send(self, data: bytes) -> None:
        """Write a whole request and wait for its reply's status and headers."""
        assert self._transport is not None
        self._busy, self._head, self._keep_alive, self._complete = True, False, False, False
        self._status, self._headers, self._chunks, self._buffered = 0, [], [], 0
        self._error = None
        self._last_data = self._loop.time()
        self._timer = self._loop.call_at(self._last_data + self._read_timeout, self._check_read)
        self._transport.write(data)
        while not self._head:
            await self._progress()

    def _take(self) -> list[bytes]:
        """The body received so far and not yet taken; reading resumes if it had stopped for it."""
        chunks, self._chunks, self._buffered = self._chunks, [], 0
        if self._paused and self._transport is not None:
            self._paused = False
            self._last_data = self._loop.time()
            self._transport.resume_reading()
        return chunks

    async def read(self) -> bytes:
        body = self._take()
        while not self._complete:
            await self._progress()
            body += self._take()
        return b"".join(body)

    async def chunks(self) -> AsyncIterator[bytes]:
        while True:
            if self._chunks:
                yield b"".join(self._take())
            elif self._complete:
                return
            else:
                await self._progress()

    def reusable(self) -> bool:
        return self._complete and self._keep_alive and not self.closed

    def done(self) -> None:
        self._busy = False

    def close(self) -> None:
        self._cancel_timer()
        if self._transport is not None:
            self._transport.close()
        self.closed = True


class Response:
    """A reply whose status and headers have arrived; its body is read with `read` or `chunks`, and
    `release` gives the connection back (or closes it when the body was not read to its end)."""

    __slots__ = ("_connection", "_pool", "headers", "status")

    def __init__(self, connection: _Connection, pool: Pool) -> None:
        self.status = connection._status
        self.headers = Headers(connection._headers)
        self._connection: _Connection | None = connection
        self._pool = pool

    async def read(self) -> bytes:
        assert self._connection is not None
        return await self._connection.read()

    def chunks(self) -> AsyncIterator[bytes]:
        assert self._connection is not None
        return self._connection.chunks()

    def release(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            self._pool.put(connection)


class Pool:
    """Kept-alive connections to one server (`url`: http or https, with an optional path prefix)."""

    def __init__(
        self,
        url: str,
        *,
        connect_timeout: float,
        read_timeout: float,
        keepalive: float,
        headers: dict[str, str],
    ) -> None:
        parts = urlsplit(url)
        self._tls = ssl.create_default_context() if parts.scheme == "https" else None
        self._host = parts.hostname or ""
        self._port = parts.port or (443 if self._tls else 80)
        self._prefix = parts.path.rstrip("/").encode()
        self._connect_timeout, self._read_timeout, self._keepalive = connect_timeout, read_timeout, keepalive
        default_port = self._port == (443 if self._tls else 80)
        authority = parts.netloc.rsplit("@", 1)[-1] if not default_port else self._host
        self._fixed = _header_lines({"host": authority, "user-agent": "convstate", **headers})
        self._idle: deque[_Connection] = deque()

    async def request(
        self, method: bytes, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
    ) -> Response:
        """Send a request (a body is sent as JSON) and return once its reply's head has arrived.
        Raises Unreachable, TransportError or TimeoutError (the server sent nothing for read_timeout)."""
        head = b"%s %s%s HTTP/1.1\r\n%s" % (method, self._prefix, path.encode(), self._fixed)
        if headers:
            head += _header_lines(headers)
        if body is None:
            data = head + b"\r\n"
        else:
            data = b"%scontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (
                head,
                len(body),
                body,
            )
        connection = self._idle_connection() or await self._connect()
        try:
            await connection.send(data)
        except BaseException:
            connection.close()
            raise
        return Response(connection, self)

    def _idle_connection(self) -> _Connection | None:
        now = asyncio.get_running_loop().time()
        while self._idle:
            connection = self._idle.pop()
            connection.idle_in = None
            if not connection.closed and now - connection.idle_since < self._keepalive:
                return connection
            connection.close()
        return None

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._connect_timeout):
                _, connection = await loop.create_connection(
                    lambda: _Connection(loop, self._read_timeout),
                    self._host,
                    self._port,
                    ssl=self._tls,
                )
        except (OSError, TimeoutError) as exc:
            raise Unreachable(f"cannot connect to {self._host}:{self._port}: {exc!r}") from None
        return connection

    def put(self, connection: _Connection) -> None:
        """Take a connection back after its reply: kept for the next call if the reply was read whole
        and the server keeps it open."""
        connection.done()
        if not connection.reusable():
            connection.close()
            return
        now = asyncio.get_running_loop().time()
        connection.idle_since = now
        connection.idle_in = self
        idle = self._idle
        while idle and now - idle[0].idle_since >= self._keepalive:
            expired = idle.popleft()
            expired.idle_in = None
            expired.close()
        idle.append(connection)

    def forget(self, connection: _Connection) -> None:
        """A connection the server closed while it was idle."""
        connection.idle_in = None
        self._idle.remove(connection)

    def close(self) -> None:
        while self._idle:
            connection = self._idle.pop()
            connection.idle_in = None
            connection.close()


def _header_lines(headers: dict[str, str]) -> bytes:
    lines = []
    for name, value in headers.items():
        if "\r" in value or "\n" in value or "\r" in name or "\n" in name:
            raise ValueError(f"a newline in header {name!r}")
        lines.append(f"{name}: {value}\r\n")
    return "".join(lines).encode()
