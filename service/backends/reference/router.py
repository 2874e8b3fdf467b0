"""A router in front of several reference-backend replicas that behaves as llm-d's session-affinity
scorer documents, for tests and the affinity benchmark (not part of the service).

llm-d's scheduler (llm-d-inference-scheduler, `session-affinity-scorer`) names the pod that served a
request in the reply: the session token is the base64 of the pod's namespaced name, sent as the
`x-session-token` response header by earlier versions and as the `llm-d-session` cookie by current
ones. A request that carries the token (header or cookie) scores that pod 1 and every other 0, so it
lands there while the pod is in the pool; without one, the other scorers (load) pick. This router does
the same with two policies:

- `session`: a request naming a known replica goes there; otherwise the least loaded (requests in
  flight; ties in turn).
- `round_robin`: every request goes to the next replica, tokens ignored (load-only routing).

Every reply carries the token of the replica that served it, both ways. `GET /router/log` lists
per routed chat completion its `x-request-id`, the replica, whether its session token chose it
(`pinned`), and the session it named (its `x-session-id` header and the body's `user`), so tests and
benchmarks can tell where each turn ran, why, and as what.
"""

from __future__ import annotations

import base64
import binascii
import itertools
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from typing import Literal

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

SESSION_HEADER = "x-session-token"
SESSION_COOKIE = "llm-d-session"
Policy = Literal["session", "round_robin"]
# Hop-by-hop and recomputed headers are not forwarded.
_DROPPED = frozenset({"host", "content-length", "connection", "transfer-encoding", "cookie"})


def session_token(replica: str) -> str:
    return base64.b64encode(replica.encode()).decode()


def token_target(token: str) -> str | None:
    try:
        return base64.b64decode(token, validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        return None


def request_token(headers: Mapping[str, str]) -> str | None:
    """The session token a request carries: the header, else the cookie."""
    if token := headers.get(SESSION_HEADER):
        return token
    for cookie in headers.get("cookie", "").split(";"):
        name, _, value = cookie.strip().partition("=")
        if name == SESSION_COOKIE and value:
            return value
    return None


@dataclass
class Replica:
    name: str  # namespace/pod, as llm-d names endpoints
    url: str
    in_flight: int = 0


@dataclass(frozen=True, slots=True)
class Routed:
    request_id: str | None
    replica: str
    pinned: bool
    session_id: str | None
    user: str | None


@dataclass
class Router:
    replicas: list[Replica]
    policy: Policy
    log: list[Routed] = field(default_factory=list)
    _turns: itertools.cycle[int] = field(init=False)

    def __post_init__(self) -> None:
        self._turns = itertools.cycle(range(len(self.replicas)))

    def pick(self, headers: Mapping[str, str]) -> tuple[Replica, bool]:
        """The replica for a request, and whether its session token chose it."""
        if self.policy == "session" and (token := request_token(headers)) is not None:
            target = token_target(token)
            for replica in self.replicas:
                if replica.name == target:
                    return replica, True
        start = next(self._turns)
        if self.policy == "round_robin":
            return self.replicas[start], False
        order = self.replicas[start:] + self.replicas[:start]
        return min(order, key=lambda replica: replica.in_flight), False


def create_router(replicas: Sequence[tuple[str, str]], policy: Policy = "session") -> FastAPI:
    """`replicas`: (namespaced name, base URL) of each reference backend."""
    router = Router([Replica(name, url.rstrip("/")) for name, url in replicas], policy)
    client = httpx.AsyncClient(timeout=httpx.Timeout(300.0, connect=5.0))

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await client.aclose()

    app = FastAPI(title="llm-d session-affinity stand-in", lifespan=lifespan)
    app.state.router = router

    async def forward(request: Request, replica: Replica) -> Response:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _DROPPED}
        upstream = client.build_request(
            request.method, replica.url + request.url.path, headers=headers, content=await request.body()
        )
        replica.in_flight += 1
        try:
            reply = await client.send(upstream, stream=True)
        except BaseException:
            replica.in_flight -= 1
            raise
        token = session_token(replica.name)
        out = {
            k: v
            for k, v in reply.headers.items()
            if k.lower() not in ("content-length", "transfer-encoding", "content-encoding", "connection")
        }
        out[SESSION_HEADER] = token

        async def body() -> AsyncIterator[bytes]:
            try:
                async for chunk in reply.aiter_raw():
                    yield chunk
            finally:
                await reply.aclose()
                replica.in_flight -= 1

        response = StreamingResponse(body(), status_code=reply.status_code, headers=out)
        response.set_cookie(SESSION_COOKIE, token, path="/", httponly=True, samesite="lax")
        return response

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        replica, pinned = router.pick(request.headers)
        try:
            body = await request.json()
        except ValueError:
            body = None  # the replica answers a body that is not JSON
        user = body.get("user") if isinstance(body, dict) else None
        headers = request.headers
        routed = Routed(headers.get("x-request-id"), replica.name, pinned, headers.get("x-session-id"), user)
        router.log.append(routed)
        return await forward(request, replica)

    @app.get("/router/log")
    async def log() -> Response:
        return JSONResponse([asdict(routed) for routed in router.log])

    @app.api_route("/{path:path}", methods=["GET", "POST"])
    async def other(request: Request, path: str) -> Response:
        """Discovery, tokenization and health: any replica answers for the pool (the first)."""
        return await forward(request, router.replicas[0])

    return app
