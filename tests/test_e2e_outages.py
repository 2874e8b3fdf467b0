"""Outages answer 503 with Retry-After in OpenAI's envelope, never a bare 500, SQL or an internal address:
a database that refuses connections, drops them, or has none free; a backend whose connection pool is
full. The backend's own failures (502) name no address or exception either."""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import orjson
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from service.errors import ServiceUnavailable
from service.serving import ServerThread, free_port
from service.store.migrate import upgrade
from service.store.responses import ResponseStore
from tests.conftest import UNPROVISIONED, Service, start_service, start_service_as, wait_for_artifact

MODEL = "ref-chatml"

# What a client-facing message must never carry.
LEAKS = (
    "127.0.0.1",
    "localhost",
    "http://",
    "postgresql",
    "SELECT",
    "INSERT",
    "sqlalchemy",
    "Error(",
    "errno",
)


def _unavailable(reply: httpx.Response) -> dict[str, Any]:
    """The error of a 503 in the envelope, with Retry-After, leaking nothing."""
    assert reply.status_code == 503, reply.text
    assert int(reply.headers["retry-after"]) >= 1
    body = reply.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    error: dict[str, Any] = body["error"]
    assert error["type"] == "server_error"
    assert not any(leak.lower() in error["message"].lower() for leak in LEAKS), error["message"]
    return error


@pytest.fixture(scope="module")
def no_database(reference_backend: ServerThread) -> Iterator[Service]:
    """The service pointed at a Postgres port nothing listens on."""
    service = start_service_as(
        UNPROVISIONED, f"postgresql+asyncpg://postgres@127.0.0.1:{free_port()}/none", reference_backend.url
    )
    yield service
    service.server.stop()


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/v1/responses", {"model": MODEL, "input": "hello"}),
        ("POST", "/v1/responses", {"model": MODEL, "input": "hello", "stream": True}),
        ("GET", "/v1/responses/resp_x", None),
        ("DELETE", "/v1/responses/resp_x", None),
        ("GET", "/v1/responses/resp_x/input_items", None),
        ("POST", "/v1/conversations", {}),
        ("GET", "/v1/conversations/conv_x/items", None),
    ],
)
def test_database_refusing_connections_is_a_503(
    no_database: Service, method: str, path: str, body: dict[str, Any] | None
) -> None:
    reply = no_database.http().request(method, path, json=body)
    assert _unavailable(reply)["code"] == "database_unavailable"


def test_the_sdk_sees_the_503_and_readiness_fails(no_database: Service) -> None:
    client = openai.OpenAI(base_url=f"{no_database.url}/v1", api_key="test", max_retries=0)
    with pytest.raises(openai.InternalServerError) as raised:
        client.responses.create(model=MODEL, input="x")
    assert raised.value.status_code == 503
    assert no_database.http().get("/readyz").status_code == 503


def test_websocket_on_a_dead_database_is_refused_with_a_503(no_database: Service) -> None:
    """The key is checked in the handshake, and checking it needs the database."""
    url = no_database.url.replace("http://", "ws://") + "/v1/responses"
    with (
        pytest.raises(InvalidStatus) as refused,
        connect(url, additional_headers={"authorization": "Bearer sk-cs-x"}, open_timeout=10),
    ):
        pass
    reply = refused.value.response
    assert reply.status_code == 503 and reply.headers["retry-after"]
    assert orjson.loads(reply.body or b"{}")["error"]["code"] == "database_unavailable"


def test_connections_dropped_by_the_database_are_a_503_then_recover(
    new_postgres_database: Any, reference_backend: ServerThread
) -> None:
    url = new_postgres_database()
    upgrade(url)
    service = start_service(url, reference_backend.url)
    try:
        http = service.http()
        first = http.post("/v1/responses", json={"model": MODEL, "input": "warm the pool"})
        assert first.status_code == 200, first.text
        # Once the turn's token artifact is stored, nothing else is about to use the pool.
        wait_for_artifact(service.admin(), first.json()["id"])
        database = url.rsplit("/", 1)[1]

        async def terminate() -> None:
            admin = create_async_engine(url.rsplit("/", 1)[0] + "/postgres")
            async with admin.connect() as conn:
                await conn.execute(
                    text(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE datname = :database AND pid <> pg_backend_pid()"
                    ),
                    {"database": database},
                )
            await admin.dispose()

        asyncio.run(terminate())
        # The pooled connection is dead: that request fails as an outage; the pool then reconnects.
        dropped = http.get(f"/v1/responses/{first.json()['id']}")
        assert _unavailable(dropped)["code"] == "database_unavailable"
        again = http.get(f"/v1/responses/{first.json()['id']}")
        assert again.status_code == 200, again.text
        # A turn's statements run on the statement pool, whose connection was dropped too: asyncpg saw it
        # close while idle and the pool opens another, so the turn goes through.
        turn = {"model": MODEL, "input": "next", "previous_response_id": first.json()["id"]}
        continued = http.post("/v1/responses", json=turn)
        assert continued.status_code == 200, continued.text
    finally:
        service.server.stop()


async def test_a_database_pool_with_no_free_connection_is_a_service_unavailable(
    migrated_urls: dict[str, str],
) -> None:
    engine = create_async_engine(migrated_urls["postgres"], pool_size=1, max_overflow=0, pool_timeout=0.2)
    store = ResponseStore(engine)
    try:
        async with engine.connect():
            with pytest.raises(ServiceUnavailable) as raised:
                await store.get("tenant", "resp_x")
        assert raised.value.retry_after == 1 and raised.value.code == "database_unavailable"
        assert await store.get("tenant", "resp_x") is None
    finally:
        await engine.dispose()


def _wait_for_backend_requests(backend: httpx.Client, count: int) -> None:
    deadline = time.monotonic() + 10
    while backend.get("/stats").json()["requests"] < count:
        assert time.monotonic() < deadline, "the first turn never reached the backend"
        time.sleep(0.01)


def test_a_full_backend_pool_answers_503_after_the_pool_timeout(
    migrated_urls: dict[str, str], reference_backend: ServerThread, backend_admin: httpx.Client
) -> None:
    service = start_service(
        migrated_urls["sqlite"],
        reference_backend.url,
        backend_max_connections=1,
        backend_pool_timeout=0.2,
        # The model card stays cached: only the chat call waits on the backend's injected latency.
        backend_info_ttl=600,
    )
    try:
        assert service.http().post("/v1/responses", json={"model": MODEL, "input": "warm"}).status_code == 200
        before = backend_admin.get("/stats").json()["requests"]
        backend_admin.post("/admin/latency", json={"ms": 1500}).raise_for_status()
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            holder = pool.submit(service.http().post, "/v1/responses", json={"model": MODEL, "input": "slow"})
            # The first turn holds the only connection for 1.5 s; the second waits 0.2 s, then gives up.
            _wait_for_backend_requests(backend_admin, before + 1)
            waiting = service.http().post("/v1/responses", json={"model": MODEL, "input": "no room"})
            assert holder.result().status_code == 200
        assert _unavailable(waiting)["code"] == "backend_busy"
        streamed = service.http().post(
            "/v1/responses", json={"model": MODEL, "input": "room again", "stream": True}
        )
        assert streamed.status_code == 200
    finally:
        backend_admin.post("/admin/latency", json={"ms": 0}).raise_for_status()
        service.server.stop()


def test_a_transient_backend_failure_is_retried_up_to_the_attempts(
    migrated_urls: dict[str, str], reference_backend: ServerThread, backend_admin: httpx.Client
) -> None:
    service = start_service(migrated_urls["sqlite"], reference_backend.url, backend_retry_attempts=3)

    def requests() -> int:
        count: int = backend_admin.get("/stats").json()["requests"]
        return count

    try:
        http = service.http()
        before = requests()
        backend_admin.post("/admin/fail", json={"count": 2, "status": 503}).raise_for_status()
        recovered = http.post("/v1/responses", json={"model": MODEL, "input": "x"})
        assert recovered.status_code == 200, recovered.text
        assert requests() - before == 3  # two refused, the third answered
        before = requests()
        backend_admin.post("/admin/fail", json={"count": 5, "status": 429}).raise_for_status()
        refused = http.post("/v1/responses", json={"model": MODEL, "input": "x"})
        assert _unavailable(refused)["code"] is not None
        assert requests() - before == 3  # the attempts, no more
        # A client error is not transient: one request, answered at once.
        backend_admin.post("/admin/fail", json={"count": 5, "status": 400}).raise_for_status()
        before = requests()
        assert http.post("/v1/responses", json={"model": MODEL, "input": "x"}).status_code == 400
        assert requests() - before == 1
    finally:
        backend_admin.post("/admin/fail", json={"count": 0}).raise_for_status()
        service.server.stop()


def test_backend_failures_name_no_address_or_exception(
    migrated_urls: dict[str, str], reference_backend: ServerThread, backend_admin: httpx.Client
) -> None:
    service = start_service(migrated_urls["sqlite"], reference_backend.url, backend_retry_attempts=1)
    try:
        http = service.http()
        backend_admin.post("/admin/fail", json={"count": 1, "status": 500}).raise_for_status()
        failed = http.post("/v1/responses", json={"model": MODEL, "input": "x"})
        assert failed.status_code == 502
        assert "Injected failure" not in failed.json()["error"]["message"]
        backend_admin.post("/admin/fail", json={"count": 1, "status": 503}).raise_for_status()
        overloaded = http.post("/v1/responses", json={"model": MODEL, "input": "x"})
        assert "Injected failure" not in _unavailable(overloaded)["message"]
    finally:
        service.server.stop()
    gone = start_service(migrated_urls["sqlite"], f"http://127.0.0.1:{free_port()}", backend_retry_attempts=1)
    try:
        reply = gone.http().post("/v1/responses", json={"model": MODEL, "input": "x"})
    finally:
        gone.server.stop()
    assert reply.status_code == 502
    message = reply.json()["error"]["message"]
    assert message == "The model backend is unreachable."
    assert not any(leak.lower() in message.lower() for leak in LEAKS)
