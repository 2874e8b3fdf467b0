"""The backend client's HTTP/1.1 transport against real servers on loopback: a scripted one, whose replies
(lengths, chunks, silences, dropped connections) are written byte by byte, and the reference backend.
Connection reuse, the read timeout, how a reply ends, and what each failure becomes."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from service.backends.client import BackendClient
from service.backends.http import Pool, TransportError, Unreachable
from service.config import Settings
from service.errors import BackendTimeout, BackendUnavailable
from service.serving import free_port

# Writes the reply to one request (its head and body given); returns whether to read another request on
# the same connection.
Handler = Callable[[asyncio.StreamWriter, bytes, bytes], Awaitable[bool]]

OK = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"


class Scripted:
    """A TCP server that reads HTTP requests and answers each with `handler`."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.url = ""
        self.connections = 0
        self.ended = 0  # connections that ended, by either side
        self.requests: list[bytes] = []

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.lower().split(b"\r\n"):
                    if line.startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                body = await reader.readexactly(length)
                self.requests.append(head + body)
                if not await self.handler(writer, head, body):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.ended += 1
            writer.close()


@asynccontextmanager
async def scripted(handler: Handler, tls: ssl.SSLContext | None = None) -> AsyncIterator[Scripted]:
    server = Scripted(handler)
    listening = await asyncio.start_server(server.serve, "127.0.0.1", 0, ssl=tls)
    scheme = "https" if tls else "http"
    server.url = f"{scheme}://127.0.0.1:{listening.sockets[0].getsockname()[1]}"
    try:
        yield server
    finally:
        listening.close()


def pool(url: str, *, read_timeout: float = 5.0, keepalive: float = 5.0) -> Pool:
    return Pool(
        url,
        connect_timeout=1.0,
        read_timeout=read_timeout,
        keepalive=keepalive,
        headers={"authorization": "k"},
    )


async def ok(writer: asyncio.StreamWriter, head: bytes, body: bytes) -> bool:
    writer.write(OK)
    return True


def chunked(*pieces: bytes) -> list[bytes]:
    return [b"%x\r\n%s\r\n" % (len(piece), piece) for piece in pieces] + [b"0\r\n\r\n"]


STREAM_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"


async def test_calls_reuse_one_kept_alive_connection_and_send_what_they_are_given() -> None:
    async with scripted(ok) as server:
        http = pool(server.url + "/base/")
        for _ in range(3):
            reply = await http.request(b"POST", "/v1/x", b'{"a":1}', {"x-request-id": "r1"})
            assert (reply.status, await reply.read()) == (200, b"{}")
            assert reply.headers.get("content-type") == "application/json"
            reply.release()
        http.close()
    assert server.connections == 1
    head, _, body = server.requests[0].partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"POST /base/v1/x HTTP/1.1"
    assert set(lines[1:]) >= {
        b"host: " + server.url.removeprefix("http://").encode(),
        b"authorization: k",
        b"x-request-id: r1",
        b"content-type: application/json",
        b"content-length: 7",
    }
    assert body == b'{"a":1}'


async def test_an_idle_connection_is_not_reused_past_keepalive() -> None:
    async with scripted(ok) as server:
        http = pool(server.url, keepalive=0.1)
        (await http.request(b"GET", "/")).release()
        await asyncio.sleep(0.15)
        (await http.request(b"GET", "/")).release()
        await asyncio.sleep(0.05)
        assert (server.connections, server.ended) == (2, 1)  # the stale one was closed, not used
        http.close()


async def closing(writer: asyncio.StreamWriter, head: bytes, body: bytes) -> bool:
    writer.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\n{}")
    return False


async def later_closing(writer: asyncio.StreamWriter, head: bytes, body: bytes) -> bool:
    """Keeps the connection open in its reply, then closes it while the client holds it idle."""
    writer.write(OK)
    await writer.drain()
    await asyncio.sleep(0.05)
    return False


async def stray_bytes(writer: asyncio.StreamWriter, head: bytes, body: bytes) -> bool:
    """Keeps the connection open, then writes the start of a reply nobody asked for."""
    writer.write(OK)
    await writer.drain()
    await asyncio.sleep(0.05)
    writer.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 9\r\n\r\nti")
    return True


@pytest.mark.parametrize("handler", [closing, later_closing, stray_bytes])
async def test_a_connection_the_server_closes_is_never_reused(handler: Handler) -> None:
    async with scripted(handler) as server:
        http = pool(server.url)
        for _ in range(2):
            reply = await http.request(b"POST", "/", b"{}")
            assert await reply.read() == b"{}"
            reply.release()
            await asyncio.sleep(0.1)
        http.close()
    assert server.connections == 2


async def test_chunked_and_close_delimited_replies_read_whole_and_as_they_arrive() -> None:
    async def stream(writer: asyncio.StreamWriter, head: bytes, body: bytes) -> bool:
        writer.write(STREAM_HEAD)
        for piece in chunked(b"data: 1\n", b"\ndata: ", b"2\n\n"):
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(0.01)
        return True

    async def until_close(writer: asyncio.StreamWriter, head: bytes, body: bytes) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\n\r\nall of it")
        return False

    async with scripted(stream) as server:
        http = pool(server.url)
        whole = await http.request(b"POST", "/", b"{}")
        assert await whole.read() == b"data: 1\n\ndata: 2\n\n"
        whole.release()
        streamed = await http.request(b"POST", "/", b"{}")
        assert b"".join([chunk async for chunk in streamed.chunks()]) == b"data: 1\n\ndata: 2\n\n"
        streamed.release()
        http.close()
    assert server.connections == 1
    async with scripted(until_close) as server:
        http = pool(server.url)
        reply = await http.request(b"POST", "/", b"{}")
        assert await reply.read() == b"all of it"
        reply.release()
        http.close()


async def test_an_unfinished_stream_gives_its_connection_up() -> None:
    async def stream(writer: asyncio.StreamWriter, head: bytes, body: bytes) -> bool:
        writer.write(STREAM_HEAD + chunked(b"data: 1\n\n")[0])
        await writer.drain()
        await asyncio.sleep(0.2)
        for piece in chunked(b"data: 2\n\n")[1:]:
            writer.write(piece)
        return True

    async with scripted(stream) as server:
        http = pool(server.url)
        reply = await http.request(b"POST", "/", b"{}")
        async for chunk in reply.chunks():
            assert chunk == b"data: 1\n\n"
            break
        reply.release()
        (await http.request(b"POST", "/", b"{}")).release()
        http.close()
    assert server.connections == 2


async def test_a_reply_larger_than_the_read_ahead_is_read_whole_and_streamed() -> None:
    big = bytes(range(256)) * 8192  # 2 MiB

    async def large(writer: asyncio.StreamWriter, head: bytes, body: bytes) -> bool:
        if b"stream" in head:
            writer.write(STREAM_HEAD)
            for piece in chunked(*(big[i : i + 65536] for i in range(0, len(big), 65536))):
                writer.write(piece)
        else:
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(big), big))
        return True

    async with scripted(large) as server:
        http = pool(server.url, read_timeout=2.0)
        async with asyncio.timeout(10):
            whole = await http.request(b"POST", "/", b"{}")
            assert await whole.read() == big
            whole.release()
            streamed = await http.request(b"POST", "/stream", b"{}")
            received = []
            async for chunk in streamed.chunks():
                received.append(chunk)
                await asyncio.sleep(0.01)  # a slow reader: the socket is left unread meanwhile
            streamed.release()
        assert b"".join(received) == big
        http.close()


async def test_the_read_timeout_counts_silence_not_the_whole_reply() -> None:
    async def trickle(writer: asyncio.StreamWriter, head: bytes, body: bytes) -> bool:
        if b"silent" in head:
            if b"after-head" in head:
                writer.write(STREAM_HEAD + chunked(b"data: 1\n\n")[0])
            await asyncio.sleep(2)
            return False
        writer.write(STREAM_HEAD)
        for piece in chunked(*[b"data: x\n\n"] * 8):
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(0.1)
        return True

    async with scripted(trickle) as server:
        http = pool(server.url, read_timeout=0.3)
        started = time.monotonic()
        reply = await http.request(b"POST", "/", b"{}")
        assert await reply.read() == b"data: x\n\n" * 8
        reply.release()
        assert time.monotonic() - started > 0.6  # longer than the timeout in all, never silent that long
        for path in ("/silent", "/silent/after-head"):
            started = time.monotonic()
            with pytest.raises(TimeoutError):
                reply = await http.request(b"POST", path, b"{}")
                try:
                    await reply.read()
                finally:
                    reply.release()
            assert 0.25 < time.monotonic() - started < 1.0
        http.close()


async def test_what_a_failed_connection_becomes() -> None:
    async def drop(writer: asyncio.StreamWriter, head: bytes, body: bytes) -> bool:
        if b"partly" in head:
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n{}")
        return False

    async def garbage(writer: asyncio.StreamWriter, head: bytes, body: bytes) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: x\r\n\r\n")
        return True

    with pytest.raises(Unreachable):
        await pool(f"http://127.0.0.1:{free_port()}").request(b"GET", "/")
    async with scripted(drop) as server:
        http = pool(server.url)
        with pytest.raises(Unreachable):  # before the reply began: safe to send again
            await http.request(b"POST", "/", b"{}")
        reply = await http.request(b"POST", "/partly", b"{}")
        with pytest.raises(TransportError):
            await reply.read()
        reply.release()
    async with scripted(garbage) as server:
        with pytest.raises(TransportError):
            await pool(server.url).request(b"GET", "/")


async def test_a_newline_never_reaches_a_header() -> None:
    async with scripted(ok) as server:
        with pytest.raises(ValueError, match="newline"):
            await pool(server.url).request(b"GET", "/", None, {"x": "a\r\nb: c"})
    assert server.requests == []


LOOPBACK = ipaddress.ip_address("127.0.0.1")


def _self_signed(directory: Path) -> Path:
    """A certificate for 127.0.0.1 and its key, in one PEM file."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "backend")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(LOOPBACK)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    path = directory / "backend.pem"
    path.write_bytes(
        certificate.public_bytes(serialization.Encoding.PEM)
        + key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return path


async def test_an_https_backend_is_verified_against_the_trusted_certificates(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pem = _self_signed(tmp_path)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(pem)
    async with scripted(ok, tls) as server:
        with pytest.raises(Unreachable, match="CERTIFICATE_VERIFY_FAILED"):
            await pool(server.url).request(b"GET", "/")
        monkeypatch.setenv("SSL_CERT_FILE", str(pem))
        http = pool(server.url)
        for _ in range(2):
            reply = await http.request(b"GET", "/")
            assert await reply.read() == b"{}"
            reply.release()
        http.close()
    assert server.connections == 1  # kept alive (the refused handshake never got to serve)


# --- the backend client over it ------------------------------------------------------------------


async def test_a_request_on_a_connection_the_server_dropped_is_sent_again() -> None:
    """A server may close a kept-alive connection just as a request goes out on it: nothing answered it,
    so the client sends it again on a new connection."""

    async def once_per_connection(writer: asyncio.StreamWriter, head: bytes, body: bytes) -> bool:
        if server.connections == 1 and len(server.requests) == 2:
            return False  # closed with no reply
        writer.write(OK)
        return True

    async with scripted(once_per_connection) as server:
        client = BackendClient(Settings(backend_url=server.url))
        try:
            assert (await client.forward("/v1/completions", {}, {}))[0] == {}
            assert (await client.forward("/v1/completions", {}, {}))[0] == {}
        finally:
            await client.aclose()
    assert server.connections == 2


async def test_a_backend_that_stops_answering_is_a_timeout_whole_or_streamed() -> None:
    async def stall(writer: asyncio.StreamWriter, head: bytes, body: bytes) -> bool:
        if b'"stream":true' in body:
            writer.write(STREAM_HEAD + chunked(b'data: {"choices":[]}\n\n')[0])
        await asyncio.sleep(2)
        return False

    async with scripted(stall) as server:
        client = BackendClient(Settings(backend_url=server.url, backend_timeout=0.3))
        try:
            with pytest.raises(BackendTimeout):
                await client.chat({"model": "m", "messages": []})
            stream = await client.open_chat_stream({"model": "m", "messages": []})
            with pytest.raises(BackendTimeout):
                async for _ in stream.deltas():
                    pass
        finally:
            await client.aclose()


async def test_a_backend_that_drops_a_stream_fails_it() -> None:
    async def drop(writer: asyncio.StreamWriter, head: bytes, body: bytes) -> bool:
        writer.write(STREAM_HEAD + chunked(b'data: {"choices":[]}\n\n')[0])
        await writer.drain()
        return False

    async with scripted(drop) as server:
        client = BackendClient(Settings(backend_url=server.url))
        try:
            stream = await client.open_chat_stream({"model": "m", "messages": []})
            with pytest.raises(BackendUnavailable, match="mid-stream"):
                async for _ in stream.deltas():
                    pass
        finally:
            await client.aclose()
