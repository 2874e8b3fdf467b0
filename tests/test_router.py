"""The llm-d session-affinity stand-in over real HTTP: it names the serving replica in every reply (header
and cookie), routes a request that carries the name there, and otherwise spreads by load or in turn."""

from __future__ import annotations

import base64
from collections.abc import Iterator

import httpx
import pytest

from service.backends.reference.config import ReferenceSettings
from service.backends.reference.router import Policy, create_router
from service.backends.reference.server import create_app
from service.serving import ServerThread

NAMES = ("llm-d/replica-0", "llm-d/replica-1", "llm-d/replica-2")
BODY = {"model": "ref-chatml", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@pytest.fixture(scope="module")
def replicas() -> Iterator[list[ServerThread]]:
    servers = [ServerThread(create_app(ReferenceSettings())).start() for _ in NAMES]
    try:
        yield servers
    finally:
        for server in servers:
            server.stop()


def _router(replicas: list[ServerThread], policy: Policy) -> ServerThread:
    return ServerThread(create_router(list(zip(NAMES, (s.url for s in replicas), strict=True)), policy))


def _served_by(reply: httpx.Response) -> str:
    return base64.b64decode(reply.headers["x-session-token"]).decode()


def test_a_session_token_pins_requests_to_its_replica(replicas: list[ServerThread]) -> None:
    with _router(replicas, "session") as router, httpx.Client(base_url=router.url, timeout=30) as http:
        first = http.post("/v1/chat/completions", json=BODY)
        assert first.status_code == 200
        home = _served_by(first)
        assert home in NAMES
        assert first.cookies["llm-d-session"] == first.headers["x-session-token"]
        token = first.headers["x-session-token"]
        by_header = [
            _served_by(http.post("/v1/chat/completions", json=BODY, headers={"x-session-token": token}))
            for _ in range(6)
        ]
        http.cookies.clear()
        by_cookie = [
            _served_by(
                http.post("/v1/chat/completions", json=BODY, headers={"cookie": f"llm-d-session={token}"})
            )
            for _ in range(3)
        ]
        assert set(by_header) == set(by_cookie) == {home}
        # Without a token (or with one naming no replica), load decides: requests spread over the pool.
        http.cookies.clear()
        unpinned = {
            _served_by(http.post("/v1/chat/completions", json=BODY, headers={"x-session-token": "bm9wZQ=="}))
            for _ in range(6)
        }
        assert unpinned == set(NAMES)


def test_round_robin_ignores_tokens_and_streams_pass_through(replicas: list[ServerThread]) -> None:
    with _router(replicas, "round_robin") as router, httpx.Client(base_url=router.url, timeout=30) as http:
        token = http.post("/v1/chat/completions", json=BODY).headers["x-session-token"]
        served = [
            _served_by(http.post("/v1/chat/completions", json=BODY, headers={"x-session-token": token}))
            for _ in range(6)
        ]
        assert set(served) == set(NAMES) and served[:3] != [served[0]] * 3
        with http.stream(
            "POST", "/v1/chat/completions", json={**BODY, "stream": True}, headers={"x-request-id": "req-s"}
        ) as stream:
            assert stream.status_code == 200 and stream.headers["x-session-token"]
            assert b"data: [DONE]" in b"".join(stream.iter_bytes())
        assert http.get("/v1/models").json()["data"][0]["id"] == "ref-chatml"
        log = http.get("/router/log").json()
        assert log[-1]["request_id"] == "req-s" and log[-1]["replica"] in NAMES
        assert not any(row["pinned"] for row in log)
