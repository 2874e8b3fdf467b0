"""Single flight across processes: eight `convstate serve` processes on one database, each sent the same
request at the same moment, make exactly one backend call; the other seven wait for it and answer its
reply. On Postgres and on SQLite (one file, shared by the processes)."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from bench.harness import Process, launch_service
from service.backends.reference.config import ReferenceSettings
from service.backends.reference.server import create_app as create_reference_app
from service.serving import ServerThread
from service.store.migrate import upgrade

PROCESSES = 8
MODEL = "ref-chatml"


@pytest.fixture(scope="module")
def backend() -> Iterator[ServerThread]:
    with ServerThread(create_reference_app(ReferenceSettings())) as server:
        yield server


@pytest.fixture(params=["postgres", "sqlite"])
def database_url(request: pytest.FixtureRequest, new_postgres_database: Any, tmp_path: Path) -> str:
    url: str = (
        new_postgres_database() if request.param == "postgres" else f"sqlite+aiosqlite:///{tmp_path / 'r.db'}"
    )
    upgrade(url)
    return url


def test_eight_processes_make_one_backend_call(database_url: str, backend: ServerThread) -> None:
    # Started at once, then awaited: on two loaded cores eight starts take longer than one's timeout.
    services = [
        launch_service(database_url, backend.url, "full", db_pool_size=2, db_max_overflow=2)
        for _ in range(PROCESSES)
    ]
    try:
        for service in services:
            service.wait_ready(timeout=180)
        # Long enough that every process has asked before the first call returns.
        httpx.post(backend.url + "/admin/latency", json={"ms": 1500})
        before = httpx.get(backend.url + "/stats").json()["requests"]
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": f"Same for everyone {uuid.uuid4().hex}"}],
            "temperature": 0,
            "max_tokens": 24,
        }
        replies: list[httpx.Response] = []
        gate = threading.Barrier(PROCESSES)

        def ask(service: Process) -> None:
            with httpx.Client(base_url=service.url, timeout=60) as client:
                headers = {"authorization": f"Bearer {service.api_key}", "x-convstate-cache": "use"}
                gate.wait()
                replies.append(client.post("/v1/chat/completions", json=body, headers=headers))

        askers = [threading.Thread(target=ask, args=(service,)) for service in services]
        for asker in askers:
            asker.start()
        for asker in askers:
            asker.join()
        assert httpx.get(backend.url + "/stats").json()["requests"] == before + 1
        assert [reply.status_code for reply in replies] == [200] * PROCESSES
        assert sorted(reply.headers["x-convstate-cache"] for reply in replies) == ["hit"] * 7 + ["miss"]
        assert len({reply.json()["choices"][0]["message"]["content"] for reply in replies}) == 1
        assert len({reply.json()["id"] for reply in replies}) == PROCESSES
    finally:
        httpx.post(backend.url + "/admin/latency", json={"ms": 0})
        for service in services:
            service.stop()
