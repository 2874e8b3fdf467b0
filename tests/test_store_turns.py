"""A turn's read and write (store/turns.py) on SQLite and on Postgres: what they store, what they refuse
when the turn lost its lock or its row, and their round trips (on Postgres one each, in a conversation or
not, whatever the depth)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable
from typing import TypeVar

import pytest
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from service.domain import ids
from service.domain.items import normalize_input
from service.domain.output import output_items
from service.errors import InvalidRequest, LeaseLost
from service.store.conversations import ConversationStore
from service.store.db import StatementCounter
from service.store.models import Conversation, Item, PrefixRecord, Response
from service.store.responses import ResponseStore, StoredResponse, TurnWrite
from service.store.turns import ConversationAppend, TurnStore
from tests.factories import prefix_write, stored_response

T = TypeVar("T")


def _turns(engine: AsyncEngine) -> TurnStore:
    return TurnStore(engine, ResponseStore(engine), ConversationStore(engine))


def _response(
    tenant: str, parent: StoredResponse | None, conversation_id: str | None = None
) -> StoredResponse:
    return stored_response(
        tenant,
        previous_response_id=parent.id if parent and conversation_id is None else None,
        conversation_id=conversation_id,
        depth=parent.depth + 1 if parent else 0,
        lineage_root=parent.lineage_root if parent else None,
        output=output_items(f"reply {uuid.uuid4().hex[:6]}", None, []),
    )


def _write(response: StoredResponse, text: str) -> TurnWrite:
    return TurnWrite(response, time.time() + 3600, normalize_input(text), response.output, prefix_write("pc"))


async def _rows(engine: AsyncEngine, response_id: str) -> tuple[int, int, int]:
    """(responses, items, prefix records) stored for a response."""
    async with engine.connect() as conn:
        counts = []
        for column in (Response.id, Item.response_id, PrefixRecord.response_id):
            counts.append(len((await conn.execute(select(column).where(column == response_id))).all()))
    return counts[0], counts[1], counts[2]


async def _conversation(engine: AsyncEngine, conversation_id: str) -> tuple[str | None, str | None, int]:
    """(head, lock holder, next position)."""
    async with engine.connect() as conn:
        row = (
            await conn.execute(
                select(
                    Conversation.head_response_id, Conversation.active_response_id, Conversation.next_position
                ).where(Conversation.id == conversation_id)
            )
        ).one()
    return row[0], row[1], row[2]


async def _trips(counter: StatementCounter, call: Awaitable[T]) -> tuple[int, T]:
    counter.reset()
    result = await call
    return counter.round_trips, result


async def test_a_chain_turn_is_one_read_and_one_write(engine: AsyncEngine) -> None:
    turns, tenant = _turns(engine), uuid.uuid4().hex
    counter = StatementCounter()
    try:
        parent = None
        costs = []
        for depth in range(4):
            response = _response(tenant, parent)
            read = 0
            if parent is not None:
                read, loaded = await _trips(counter, turns.load_parent(tenant, parent.id, time.time()))
                assert loaded is not None and loaded.response.id == parent.id
                assert loaded.response.output == parent.output and loaded.response.depth == depth - 1
                assert loaded.prefix is not None and loaded.prefix.handle_ref == "pc"
            write, _ = await _trips(counter, turns.write(_write(response, f"t{depth}"), None, opened=False))
            costs.append((read, write))
            parent = response
    finally:
        counter.close()
    assert parent is not None and await _rows(engine, parent.id) == (1, 2, 1)
    assert await turns.load_parent("another-tenant", parent.id, time.time()) is None
    # After the first use of each statement on the connection (its preparation is a round trip):
    if engine.dialect.name == "postgresql":
        assert costs[2:] == [(1, 1), (1, 1)]
    else:  # in one transaction: the response, its items, its prefix record
        assert costs[2:] == [(1, 3), (1, 3)]


async def test_a_conversation_turn_takes_the_lock_with_its_head_and_joins_at_once(
    engine: AsyncEngine,
) -> None:
    turns, conversations, tenant = _turns(engine), ConversationStore(engine), uuid.uuid4().hex
    conversation = await conversations.create(
        tenant, metadata={}, items=normalize_input("seed"), now=time.time()
    )
    counter = StatementCounter()
    costs = []
    head = None
    try:
        for turn_number in range(4):
            response = _response(tenant, head, conversation.id)
            begin, begun = await _trips(
                counter, turns.begin(tenant, conversation.id, response.id, 30, time.time())
            )
            assert begun is not None
            state, parent = begun
            assert state.next_position == 1 + 2 * turn_number
            assert (parent.response.id if parent else None) == (head.id if head else None)
            if parent is not None:
                assert head is not None and parent.response.output == head.output
            assert (await _conversation(engine, conversation.id))[1] == response.id
            append = ConversationAppend(conversation.id, state.next_position, joins=True)
            write, _ = await _trips(
                counter, turns.write(_write(response, f"t{turn_number}"), append, opened=False)
            )
            costs.append((begin, write))
            head = response
    finally:
        counter.close()
    assert head is not None
    assert await _conversation(engine, conversation.id) == (head.id, None, 9)
    history = await conversations.history(tenant, conversation.id)
    texts = [item["content"][0]["text"] for _, items in history for item in items]
    assert texts[0] == "seed" and texts[-2:] == ["t3", head.output[0]["content"][0]["text"]]
    if engine.dialect.name == "postgresql":
        assert costs[2:] == [(1, 1), (1, 1)]


async def test_a_turn_that_lost_its_lock_writes_nothing(engine: AsyncEngine) -> None:
    turns, conversations, tenant = _turns(engine), ConversationStore(engine), uuid.uuid4().hex
    conversation = await conversations.create(tenant, metadata={}, items=[], now=time.time())
    now = time.time()
    late = _response(tenant, None, conversation.id)
    begun = await turns.begin(tenant, conversation.id, late.id, 30, now)
    assert begun is not None
    with pytest.raises(InvalidRequest) as locked:
        await turns.begin(tenant, conversation.id, ids.new_id(ids.RESPONSE), 30, now + 1)
    assert locked.value.code == "conversation_locked"
    assert await turns.begin(tenant, "conv_unknown", late.id, 30, now) is None
    # Its lease lapses and another turn takes the conversation over.
    taken = await turns.begin(tenant, conversation.id, ids.new_id(ids.RESPONSE), 30, now + 31)
    assert taken is not None
    with pytest.raises(InvalidRequest) as lost:
        await turns.write(
            _write(late, "late"),
            ConversationAppend(conversation.id, begun[0].next_position, True),
            opened=False,
        )
    assert lost.value.code == "conversation_locked"
    assert await _rows(engine, late.id) == (0, 0, 0)


async def test_an_open_turn_finishes_into_its_conversation_or_not_at_all(engine: AsyncEngine) -> None:
    turns, conversations, tenant = _turns(engine), ConversationStore(engine), uuid.uuid4().hex
    conversation = await conversations.create(
        tenant, metadata={}, items=normalize_input("seed"), now=time.time()
    )
    running = _response(tenant, None, conversation.id)
    running.status, running.completed_at = "in_progress", None
    begun = await turns.begin(tenant, conversation.id, running.id, 30, time.time())
    assert begun is not None
    write = _write(running, "question")
    await turns.open(TurnWrite(running, write.expires_at, write.input_items, [], None), time.time() + 30)
    assert await _rows(engine, running.id) == (1, 1, 0)
    done = StoredResponse(
        **{**{k: getattr(running, k) for k in StoredResponse.__slots__}, "status": "completed"}
    )
    done.completed_at = time.time()
    finished = TurnWrite(done, write.expires_at, write.input_items, done.output, write.prefix)
    await turns.write(
        finished, ConversationAppend(conversation.id, begun[0].next_position, True), opened=True
    )
    assert await _rows(engine, running.id) == (1, 2, 1)
    assert await _conversation(engine, conversation.id) == (running.id, None, 3)
    history = await conversations.history(tenant, conversation.id)
    assert [item["id"] for _, items in history for item in items][1:] == [
        write.input_items[0]["id"],
        done.output[0]["id"],
    ]
    # A second finish finds the row no longer in progress: nothing more is written.
    again = await turns.begin(tenant, conversation.id, running.id, 30, time.time())
    assert again is not None
    with pytest.raises(LeaseLost):
        await turns.write(
            finished, ConversationAppend(conversation.id, again[0].next_position, True), opened=True
        )
    assert await _rows(engine, running.id) == (1, 2, 1)
    assert await _conversation(engine, conversation.id) == (running.id, running.id, 3)


async def test_a_failed_turn_only_frees_its_conversation(engine: AsyncEngine) -> None:
    turns, conversations, tenant = _turns(engine), ConversationStore(engine), uuid.uuid4().hex
    conversation = await conversations.create(tenant, metadata={}, items=[], now=time.time())
    failed = _response(tenant, None, conversation.id)
    failed.status = "failed"
    begun = await turns.begin(tenant, conversation.id, failed.id, 30, time.time())
    assert begun is not None
    await turns.write(_write(failed, "x"), ConversationAppend(conversation.id, 0, joins=False), opened=False)
    assert await _rows(engine, failed.id) == (1, 2, 1)
    assert await _conversation(engine, conversation.id) == (None, None, 0)
    assert await conversations.history(tenant, conversation.id) == []


async def test_a_cancelled_open_turn_is_not_finished(engine: AsyncEngine) -> None:
    turns, tenant = _turns(engine), uuid.uuid4().hex
    running = _response(tenant, None)
    running.status, running.completed_at, running.background = "in_progress", None, True
    await turns.open(TurnWrite(running, time.time() + 60, normalize_input("q"), [], None), time.time() + 30)
    async with engine.begin() as conn:
        await conn.execute(update(Response).where(Response.id == running.id).values(status="cancelled"))
    done = StoredResponse(
        **{**{k: getattr(running, k) for k in StoredResponse.__slots__}, "status": "completed"}
    )
    with pytest.raises(LeaseLost):
        await turns.write(_write(done, "q"), None, opened=True)
    assert await _rows(engine, running.id) == (1, 1, 0)
