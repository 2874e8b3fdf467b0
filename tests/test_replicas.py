"""Several replicas, one service: three `convstate serve` processes on one Postgres behind a round-robin
front, driven over HTTP with the openai SDK. A chain whose turns alternate replicas keeps every turn and
its cache hits; a background response created on one replica is cancelled through another; a
conversation's lock holds across replicas; a background stream created on one replica is followed and
resumed through the others; a replica killed mid-turn loses nothing acknowledged; a rolling
restart of every replica under load loses nothing acknowledged."""

from __future__ import annotations

import asyncio
import itertools
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import openai
import pytest
from sqlalchemy.engine import make_url

from bench.harness import start_service
from service.backends.reference.config import ReferenceSettings
from service.backends.reference.server import create_app as create_reference_app
from service.serving import ServerThread
from service.store.migrate import upgrade
from tests.conftest import start_service as start_in_process
from tests.oracle import full_render_digest
from tests.replicas import UPSTREAM_HEADER, Load, ReplicaSet

MODEL = "ref-chatml"
# Small pools: three replicas share the test cluster's max_connections with the rest of the suite.
REPLICA_SETTINGS = {"db_pool_size": 4, "db_max_overflow": 4, "log_level": "warning"}


@pytest.fixture(scope="module")
def backend() -> Iterator[ServerThread]:
    """This module's own reference backend, so its latency faults touch no other test."""
    with ServerThread(create_reference_app(ReferenceSettings())) as server:
        yield server


@pytest.fixture(scope="module")
def database(new_postgres_database: Any) -> str:
    url: str = new_postgres_database()
    upgrade(url)
    return url


@pytest.fixture(scope="module")
def replicas(database: str, backend: ServerThread) -> Iterator[ReplicaSet]:
    with ReplicaSet(database, backend.url, "cache_ref", 3, **REPLICA_SETTINGS) as replica_set:
        yield replica_set


def client(url: str, api_key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0, timeout=60)


class Latency:
    """The reference backend answers every call `ms` later while the block runs."""

    def __init__(self, backend: ServerThread, ms: int) -> None:
        self.backend, self.ms = backend, ms

    def __enter__(self) -> None:
        httpx.post(f"{self.backend.url}/admin/latency", json={"ms": self.ms}).raise_for_status()

    def __exit__(self, *exc: object) -> None:
        httpx.post(f"{self.backend.url}/admin/latency", json={"ms": 0}).raise_for_status()


def sql(database: str, statement: str, *args: object) -> object:
    """One statement straight on the database (the first column of its first row)."""

    async def run() -> object:
        target = make_url(database)
        conn = await asyncpg.connect(
            host=target.host, port=target.port, user=target.username, database=target.database
        )
        try:
            return await conn.fetchval(statement, *args)
        finally:
            await conn.close()

    return asyncio.run(run())


def wait_for(predicate: Any, what: str, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_chain_alternating_replicas_keeps_every_turn_and_its_cache_hits(
    replicas: ReplicaSet, backend: ServerThread
) -> None:
    sdk = client(replicas.url, replicas.api_key)
    previous, history, served, decisions, ids = None, [], [], [], []
    for turn in range(6):
        text = f"Turn {turn}: continue the plan."
        raw = sdk.responses.with_raw_response.create(
            model=MODEL, input=text, previous_response_id=previous, instructions="Be brief."
        )
        response = raw.parse()
        history.append({"role": "user", "content": text})
        # The exact prompt the backend generated from is the full history, whichever replica sent it.
        expected = full_render_digest(
            backend.url, MODEL, [{"role": "system", "content": "Be brief."}, *history]
        )
        assert raw.headers["x-convstate-prompt-digest"] == expected
        history.append({"role": "assistant", "content": response.output_text})
        served.append(raw.headers[UPSTREAM_HEADER])
        decisions.append(raw.headers["x-convstate-decision"])
        ids.append(response.id)
        previous = response.id
    assert all(a != b for a, b in itertools.pairwise(served))  # every turn on another replica
    assert set(served) == set(replicas.front.upstreams)
    assert decisions == ["full; reason=no_parent"] + ["cache_ref; reason=hit"] * 5
    for replica in replicas.replicas:  # every replica reads the whole chain
        for index, response_id in enumerate(ids):
            stored = client(replica.url, replicas.api_key).responses.retrieve(response_id)
            assert stored.status == "completed"
            assert stored.previous_response_id == (ids[index - 1] if index else None)


def test_a_background_response_created_on_one_replica_is_cancelled_through_another(
    replicas: ReplicaSet, backend: ServerThread
) -> None:
    first, second, third = (client(replica.url, replicas.api_key) for replica in replicas.replicas)
    with Latency(backend, 3000):
        queued = first.responses.create(model=MODEL, input="slow work", background=True)
        wait_for(lambda: second.responses.retrieve(queued.id).status == "in_progress", "the worker to start")
        assert second.responses.cancel(queued.id).status == "cancelled"
        assert third.responses.retrieve(queued.id).status == "cancelled"
        time.sleep(3.5)  # past the backend's reply: the worker on the first replica must not complete it
    assert first.responses.retrieve(queued.id).status == "cancelled"
    assert third.responses.retrieve(queued.id).output == []


def test_a_background_stream_is_followed_and_resumed_through_other_replicas(
    replicas: ReplicaSet, backend: ServerThread
) -> None:
    first, second, third = (client(replica.url, replicas.api_key) for replica in replicas.replicas)
    httpx.post(f"{backend.url}/admin/stream", json={"chunk_delay_ms": 100}).raise_for_status()
    try:
        stream = first.responses.create(
            model=MODEL, input="a long one", background=True, stream=True, max_output_tokens=40
        )
        iterator = iter(stream)
        opening = next(iterator)
        assert opening.type == "response.created"
        followed = list(second.responses.retrieve(opening.response.id, stream=True))
        created = [opening, *iterator]
    finally:
        httpx.post(f"{backend.url}/admin/stream", json={}).raise_for_status()
    dumped = [event.model_dump(mode="json") for event in created]
    assert [event.model_dump(mode="json") for event in followed] == dumped
    assert dumped[-1]["type"] == "response.completed"
    resumed = third.responses.retrieve(opening.response.id, stream=True, starting_after=3)
    assert [event.model_dump(mode="json") for event in resumed] == dumped[4:]


def _conversation_turn(url: str, api_key: str, conversation: str, text: str) -> httpx.Response:
    body = {"model": MODEL, "input": text, "conversation": conversation}
    return httpx.post(f"{url}/v1/responses", json=body, timeout=60, headers=_auth(api_key))


def _auth(api_key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {api_key}"}


def test_a_conversation_lock_holds_across_replicas(
    replicas: ReplicaSet, backend: ServerThread, database: str
) -> None:
    one, other = replicas.replicas[0].url, replicas.replicas[1].url
    conversation = client(one, replicas.api_key).conversations.create().id
    results: dict[str, httpx.Response] = {}
    with Latency(backend, 2000):
        slow = threading.Thread(
            target=lambda: results.update(
                first=_conversation_turn(one, replicas.api_key, conversation, "first")
            )
        )
        slow.start()
        holder = "SELECT active_response_id FROM conversations WHERE id = $1"
        wait_for(lambda: sql(database, holder, conversation), "the first turn to take the lock")
        racing = _conversation_turn(other, replicas.api_key, conversation, "racing")
        slow.join(timeout=30)
    assert results["first"].status_code == 200
    assert racing.status_code in (400, 409) and racing.json()["error"]["code"] == "conversation_locked"
    after = _conversation_turn(other, replicas.api_key, conversation, "after")
    assert after.status_code == 200
    listed = httpx.get(
        f"{one}/v1/conversations/{conversation}/items",
        params={"order": "asc"},
        headers=_auth(replicas.api_key),
    ).json()
    messages = [
        (item["role"], item["content"][0]["text"]) for item in listed["data"] if item["type"] == "message"
    ]
    assert [role for role, _ in messages] == ["user", "assistant"] * 2  # nothing interleaved
    assert [text for role, text in messages if role == "user"] == [
        "first",
        "after",
    ]  # the refused turn left nothing


def test_a_replica_killed_mid_turn_loses_nothing_acknowledged(
    replicas: ReplicaSet, backend: ServerThread
) -> None:
    sdk = client(replicas.url, replicas.api_key)
    acknowledged = []
    previous = None
    for turn in range(3):
        response = sdk.responses.create(model=MODEL, input=f"step {turn}", previous_response_id=previous)
        acknowledged.append((response.id, response.output_text))
        previous = response.id
    victim = replicas.replicas[2]
    outcome: dict[str, object] = {}

    def doomed_turn() -> None:
        try:
            outcome["reply"] = client(victim.url, replicas.api_key).responses.create(
                model=MODEL, input="never acknowledged", previous_response_id=previous
            )
        except openai.APIConnectionError as exc:
            outcome["error"] = exc

    with Latency(backend, 3000):
        in_flight = threading.Thread(target=doomed_turn)
        in_flight.start()
        time.sleep(1.0)  # the turn is in flight: at the replica or waiting for the backend's reply
        assert victim.signal(signal.SIGKILL) == -signal.SIGKILL
        in_flight.join(timeout=30)
    assert "error" in outcome and "reply" not in outcome
    assert replicas.replace(2) == -signal.SIGKILL
    for response_id, text in acknowledged:
        for replica in replicas.replicas:
            stored = client(replica.url, replicas.api_key).responses.retrieve(response_id)
            assert (stored.status, stored.output_text) == ("completed", text)
    # The lineage continues where the acknowledged turns end, still on the cache path.
    raw = sdk.responses.with_raw_response.create(model=MODEL, input="step 3", previous_response_id=previous)
    assert raw.parse().status == "completed"
    assert raw.headers["x-convstate-decision"] == "cache_ref; reason=hit"


def test_a_rolling_restart_under_load_loses_nothing_acknowledged(
    replicas: ReplicaSet, backend: ServerThread
) -> None:
    before = list(replicas.front.upstreams)
    with Latency(backend, 100), Load(replicas.url, conversations=4, api_key=replicas.api_key) as load:
        wait_for(lambda: len(load.acknowledged) >= 8, "load to start")
        statuses = replicas.rolling_restart()
        during = len(load.acknowledged)
        wait_for(lambda: len(load.acknowledged) >= during + 8, "turns on the new replicas")
    # Each exited on its own after draining (uvicorn re-raises SIGTERM once shut down), none was killed.
    assert statuses == [-signal.SIGTERM] * 3
    assert not set(before) & set(replicas.front.upstreams)
    lost = load.missing()
    assert lost == [], f"{len(lost)} of {len(load.acknowledged)} acknowledged turns lost"
    # A drained replica finished what it had accepted: a client saw at most a refused connection, never a
    # turn that failed half-way.
    assert [failure for failure in load.failures if "502 upstream failed" in failure] == []


def test_one_replica_can_run_several_worker_processes(database: str, backend: ServerThread) -> None:
    with start_service(database, backend.url, "full", workers=2, **REPLICA_SETTINGS) as service:
        children = [
            entry
            for entry in Path("/proc").iterdir()
            if entry.name.isdigit() and _parent(entry) == service.pid and "spawn_main" in _command(entry)
        ]
        assert len(children) >= 2, "uvicorn started fewer than two workers"
        sdk = client(service.url, service.api_key)
        previous = sdk.responses.create(model=MODEL, input="w0").id
        for turn in range(1, 4):
            previous = sdk.responses.create(model=MODEL, input=f"w{turn}", previous_response_id=previous).id
        assert sdk.responses.retrieve(previous).status == "completed"


def _parent(proc: Path) -> int | None:
    try:
        return int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _command(proc: Path) -> str:
    try:
        return (proc / "cmdline").read_text().replace("\0", " ")
    except OSError:
        return ""


def test_an_older_replica_stays_ready_on_a_schema_a_newer_release_migrated(
    new_postgres_database: Any, backend: ServerThread
) -> None:
    """During a rolling update the pre-upgrade hook migrates first and old pods keep serving: readiness
    fails only for a schema this code knows to be older than its head, not for one newer than it knows."""
    url: str = new_postgres_database()
    upgrade(url)
    service = start_in_process(url, backend.url)

    def stamp(revision: str) -> httpx.Response:
        sql(url, "UPDATE alembic_version SET version_num = $1", revision)
        return service.http().get("/readyz")

    try:
        assert service.http().get("/readyz").status_code == 200
        older = stamp("0003")
        assert older.status_code == 503 and "at 0003" in older.json()["database"]
        newer = stamp("9999_from_a_newer_release")
        assert newer.status_code == 200 and newer.json()["database"] == "9999_from_a_newer_release"
    finally:
        service.server.stop()
