"""Several `convstate serve` processes on one Postgres behind a round-robin front on loopback: what the
chart's Service (or a gateway) does in front of its Deployment, small enough to reason about. Used by the
multi-replica tests and `python -m bench.replicas`."""

from __future__ import annotations

import signal
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import httpx

from bench.harness import Process, start_service
from service.serving import ServerThread

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

# Headers that describe one hop, not the message: never forwarded.
HOP_BY_HOP = {b"connection", b"keep-alive", b"transfer-encoding", b"host", b"date", b"server", b"upgrade"}
UPSTREAM_HEADER = "x-upstream"


class RoundRobin:
    """An ASGI reverse proxy: each request goes to the next upstream in turn, streamed both ways.

    An upstream that refuses the connection is skipped and the next one tried, which is safe because
    nothing was sent (a gateway's retry on connect failure). A failure after the request was sent is
    answered 502: the turn may or may not have happened, so the client must not count it acknowledged.
    No connection is kept alive, so a replica that drains never sees a request on a half-closed one.
    The reply names the upstream that served it in `x-upstream`."""

    def __init__(self) -> None:
        self.upstreams: list[str] = []
        self.served: Counter[str] = Counter()
        self._next = 0
        self._client: httpx.AsyncClient | None = None

    def _pick(self) -> str:
        upstream = self.upstreams[self._next % len(self.upstreams)]
        self._next += 1
        return upstream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http":
            await self._forward(scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self._client = httpx.AsyncClient(
                    limits=httpx.Limits(max_keepalive_connections=0),
                    timeout=httpx.Timeout(120.0, connect=2.0),
                )
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self._client is not None:
                    await self._client.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _forward(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert self._client is not None
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = [(name, value) for name, value in scope["headers"] if name not in HOP_BY_HOP]
        target = scope["path"] + (f"?{scope['query_string'].decode()}" if scope["query_string"] else "")
        for _ in range(len(self.upstreams)):
            upstream = self._pick()
            request = self._client.build_request(
                scope["method"], upstream + target, headers=headers, content=body
            )
            try:
                reply = await self._client.send(request, stream=True)
            except httpx.ConnectError:
                continue
            except httpx.HTTPError:
                await _plain(send, 502, b"upstream failed after the request was sent")
                return
            try:
                self.served[upstream] += 1
                forwarded = [
                    (name, value) for name, value in reply.headers.raw if name.lower() not in HOP_BY_HOP
                ]
                forwarded.append((UPSTREAM_HEADER.encode(), upstream.encode()))
                await send({"type": "http.response.start", "status": reply.status_code, "headers": forwarded})
                async for chunk in reply.aiter_raw():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.body", "body": b""})
            finally:
                await reply.aclose()
            return
        await _plain(send, 502, b"no upstream accepted the connection")


async def _plain(send: Send, status: int, text: bytes) -> None:
    await send(
        {"type": "http.response.start", "status": status, "headers": [(b"content-type", b"text/plain")]}
    )
    await send({"type": "http.response.body", "body": text})


class ReplicaSet:
    """`count` replicas of `convstate serve` (real processes) on one database behind a RoundRobin front.

    Replacing a replica follows a rolling update: the front stops routing to it (the endpoint is removed),
    a short pause lets requests already routed to it connect (the chart's preStop sleep: a connection
    still in the listen backlog when the socket closes is reset after its request was sent), then it gets
    SIGTERM and drains, then a new process on a new port joins the front once ready."""

    PRE_STOP_SECONDS = 0.5

    def __init__(
        self, database_url: str, backend_url: str, mode: str, count: int, **settings: object
    ) -> None:
        def start() -> Process:
            return start_service(database_url, backend_url, mode, **settings)

        self._start = start
        self.front = RoundRobin()
        self.server = ServerThread(self.front).start()
        self.replicas: list[Process] = []
        try:
            for _ in range(count):
                self.replicas.append(self._start())
        except BaseException:
            self.close()
            raise
        self.front.upstreams = [replica.url for replica in self.replicas]
        # Every replica's key is one of the same tenant's in the shared database: any of them works on all.
        self.api_key = self.replicas[0].api_key

    @property
    def url(self) -> str:
        return self.server.url

    def replace(self, index: int, signum: int = signal.SIGTERM) -> int:
        """Take replica `index` out of rotation, stop it with `signum`, start its successor; the old
        process's exit status (negative: killed by that signal)."""
        old = self.replicas[index]
        self.front.upstreams = [url for url in self.front.upstreams if url != old.url]
        time.sleep(self.PRE_STOP_SECONDS)
        status = old.signal(signum)
        old.stop()
        self.replicas[index] = self._start()
        self.front.upstreams = [*self.front.upstreams, self.replicas[index].url]
        return status

    def rolling_restart(self) -> list[int]:
        return [self.replace(index) for index in range(len(self.replicas))]

    def close(self) -> None:
        for replica in self.replicas:
            replica.stop()
        self.server.stop()

    def __enter__(self) -> ReplicaSet:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


@dataclass(slots=True)
class Acknowledged:
    id: str
    previous: str | None
    text: str
    seconds: float


class Load:
    """Conversations driven through `url` by threads until stopped, bounded in turns and time. A turn
    counts as acknowledged only when its 200 arrives; a failed attempt is retried from the same parent,
    as a client would."""

    def __init__(
        self,
        url: str,
        conversations: int,
        *,
        api_key: str,
        model: str = "ref-chatml",
        max_turns: int = 400,
        max_seconds: float = 180.0,
    ) -> None:
        self.url = url
        self.api_key = api_key
        self.model = model
        self.acknowledged: list[Acknowledged] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._deadline = time.monotonic() + max_seconds
        self._max_turns = max_turns
        self._threads = [
            threading.Thread(target=self._drive, args=(index,)) for index in range(conversations)
        ]

    def _drive(self, index: int) -> None:
        previous: str | None = None
        headers = {"authorization": f"Bearer {self.api_key}"}
        with httpx.Client(base_url=self.url, timeout=60, headers=headers) as http:
            for turn in range(self._max_turns):
                if self._stop.is_set() or time.monotonic() > self._deadline:
                    return
                body: dict[str, Any] = {"model": self.model, "input": f"conversation {index} turn {turn}"}
                if previous is not None:
                    body["previous_response_id"] = previous
                started = time.perf_counter()
                try:
                    reply = http.post("/v1/responses", json=body)
                except httpx.HTTPError as exc:
                    self.failures.append(repr(exc))
                    continue
                if reply.status_code != 200:
                    self.failures.append(f"{reply.status_code} {reply.text[:200]}")
                    time.sleep(0.1)
                    continue
                payload = reply.json()
                text = payload["output"][0]["content"][0]["text"]
                elapsed = time.perf_counter() - started
                self.acknowledged.append(Acknowledged(payload["id"], previous, text, elapsed))
                previous = payload["id"]

    def missing(self) -> list[str]:
        """Acknowledged turns that are not stored as the client saw them: must be none."""
        lost = []
        headers = {"authorization": f"Bearer {self.api_key}"}
        with httpx.Client(base_url=self.url, timeout=60, headers=headers) as http:
            for turn in self.acknowledged:
                stored = http.get(f"/v1/responses/{turn.id}")
                payload = stored.json() if stored.status_code == 200 else {}
                seen = (payload.get("status"), payload.get("previous_response_id"), _output_text(payload))
                if seen != ("completed", turn.previous, turn.text):
                    lost.append(turn.id)
        return lost

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=90)


def _output_text(payload: dict[str, Any]) -> str | None:
    output = payload.get("output") or [{}]
    content = output[0].get("content") or [{}]
    text: str | None = content[0].get("text")
    return text
