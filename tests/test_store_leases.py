"""Leases on running turns, the reaper and cancel, on SQLite and on Postgres: every one is a conditional
UPDATE that rechecks status (and lease) itself and reports what it changed, so of two racing writers
exactly one wins and the other learns it."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncEngine

from service.domain.items import normalize_input
from service.domain.output import output_items
from service.errors import ServiceUnavailable
from service.serving import free_port
from service.store.conversations import ConversationStore
from service.store.db import StatementCounter, create_engine, dispose
from service.store.models import Response
from service.store.responses import ResponseStore, StoredResponse, TurnWrite
from service.store.turns import TurnStore
from service.store.unit import unit_of_work
from service.workers.reaper import reap_once
from tests.factories import prefix_write, stored_response


async def _open(
    store: ResponseStore, lease_expires_at: float, *, status: str = "in_progress", **fields: object
) -> StoredResponse:
    response = stored_response(uuid.uuid4().hex, status=status, completed_at=None, **fields)
    await store.open_turn(TurnWrite(response, time.time() + 60, [], [], None), lease_expires_at)
    return response


async def _status(store: ResponseStore, response: StoredResponse) -> str:
    stored = await store.get(response.tenant, response.id)
    assert stored is not None
    return stored.status


async def test_the_reaper_fails_only_what_outlived_its_lease(engine: AsyncEngine) -> None:
    store, conversations = ResponseStore(engine), ConversationStore(engine)
    now = time.time()
    orphans = [
        await _open(store, now - 1, status="queued", background=True),
        await _open(store, now - 1),
    ]
    live = await _open(store, now + 60)
    # (Other replicas these tests started reap the same database: whichever pass comes first does it.)
    reaped = await reap_once(store, conversations)
    assert live.id not in {entry.id for entry in reaped}
    for orphan in orphans:
        stored = await store.get(orphan.tenant, orphan.id)
        assert stored is not None and stored.status == "failed" and stored.error is not None
    assert await _status(store, live) == "in_progress"
    # Nothing to do twice: a second pass changes nothing it already changed.
    assert not {orphan.id for orphan in orphans} & {
        entry.id for entry in await reap_once(store, conversations)
    }


async def test_the_reaper_frees_the_conversation_its_dead_turn_held(engine: AsyncEngine) -> None:
    store, conversations = ResponseStore(engine), ConversationStore(engine)
    now = time.time()
    conversation = await conversations.create("t", metadata={}, items=[], now=now)
    dead = stored_response("t", status="in_progress", completed_at=None, conversation_id=conversation.id)
    assert await conversations.begin_turn("t", conversation.id, dead.id, 60, now) is not None
    await store.open_turn(TurnWrite(dead, now + 60, [], [], None), now - 1)
    await reap_once(store, conversations)
    assert await _status(store, dead) == "failed"
    # Free at once, though the lock's own lease has not run out yet.
    assert await conversations.begin_turn("t", conversation.id, "resp_next", 60, now) is not None


async def test_the_reaper_never_fails_a_response_committing_its_completion(engine: AsyncEngine) -> None:
    store, conversations = ResponseStore(engine), ConversationStore(engine)
    running = await _open(store, time.time() + 1)
    async with engine.begin() as conn:
        # The turn commits `completed` while the reaper's pass waits on the row.
        await conn.execute(update(Response).where(Response.id == running.id).values(status="completed"))
        await asyncio.sleep(1.5)  # meanwhile its lease runs out: a late heartbeat
        reaping = asyncio.create_task(reap_once(store, conversations))
        await asyncio.sleep(0.5)
    reaped = await reaping
    assert running.id not in {entry.id for entry in reaped}
    assert await _status(store, running) == "completed"


async def test_finish_loses_to_cancel_and_cancel_loses_to_finish(engine: AsyncEngine) -> None:
    store = ResponseStore(engine)
    now = time.time()
    cancelled = await _open(store, now + 60, background=True)
    after = await store.cancel(cancelled.tenant, cancelled.id, now)
    assert after is not None and after.status == "cancelled"
    assert not await store.renew_lease(cancelled.id, now + 90)
    done = StoredResponse(
        **{**{k: getattr(cancelled, k) for k in StoredResponse.__slots__}, "status": "completed"}
    )
    async with unit_of_work(engine) as uow:
        assert not await store.finish(uow, TurnWrite(done, now + 60, [], [], None))
    assert await _status(store, cancelled) == "cancelled"

    finished = await _open(store, now + 60, background=True)
    done = StoredResponse(
        **{**{k: getattr(finished, k) for k in StoredResponse.__slots__}, "status": "completed"}
    )
    async with unit_of_work(engine) as uow:
        assert await store.finish(uow, TurnWrite(done, now + 60, [], [], None))
    after = await store.cancel(finished.tenant, finished.id, now)
    assert after is not None and after.status == "completed"


async def test_an_open_turn_costs_one_round_trip_to_open_and_one_to_finish(engine: AsyncEngine) -> None:
    turns = TurnStore(engine, ResponseStore(engine), ConversationStore(engine))
    counter = StatementCounter()
    costs = []
    try:
        for _ in range(2):  # the first pass also prepares the statements on the connection
            response = stored_response(uuid.uuid4().hex, status="in_progress", completed_at=None)
            counter.reset()
            inputs = normalize_input("hello")
            await turns.open(TurnWrite(response, time.time() + 60, inputs, [], None), time.time() + 15)
            opened = counter.round_trips
            done = StoredResponse(
                **{
                    **{k: getattr(response, k) for k in StoredResponse.__slots__},
                    "status": "completed",
                    "output": output_items("hi", None, []),
                }
            )
            counter.reset()
            await turns.write(
                TurnWrite(done, time.time() + 60, inputs, done.output, prefix_write()), None, opened=True
            )
            costs.append((opened, counter.round_trips))
    finally:
        counter.close()
    # SQLite: the row and its input; the row moved on, its output, its prefix record.
    assert costs[1] == ((1, 1) if engine.dialect.name == "postgresql" else (2, 3))


async def test_a_unit_of_work_on_an_unreachable_database_is_a_service_unavailable() -> None:
    engine = create_engine(f"postgresql+asyncpg://postgres@127.0.0.1:{free_port()}/none")
    try:
        with pytest.raises(ServiceUnavailable) as raised:
            async with unit_of_work(engine) as uow:
                await ResponseStore(engine).write_turn(uow, TurnWrite(stored_response("t"), 0, [], [], None))
        assert raised.value.code == "database_unavailable"
    finally:
        await dispose(engine)
