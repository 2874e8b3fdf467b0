"""Conversation store tests, on SQLite and on Postgres: the item list, versions, the turn lock and round
trips that do not grow with the length of a conversation."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable
from typing import Any, TypeVar

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from service.domain import ids
from service.domain.items import normalize_input
from service.domain.output import output_items
from service.errors import InvalidRequest, NotFound
from service.store.conversations import ConversationStore, ConversationTurn, StoredConversation
from service.store.db import StatementCounter
from service.store.responses import ResponseStore, StoredResponse, TurnWrite
from service.store.turns import ConversationAppend, TurnStore
from service.store.unit import unit_of_work
from tests.factories import stored_response

T = TypeVar("T")


def _messages(*texts: str) -> list[dict[str, Any]]:
    return normalize_input([{"role": "user", "content": text} for text in texts]) if texts else []


def _ids(items: list[dict[str, Any]]) -> list[str]:
    return [item["id"] for item in items]


async def _new(store: ConversationStore, tenant: str, *texts: str) -> tuple[StoredConversation, list[str]]:
    items = _messages(*texts)
    conversation = await store.create(tenant, metadata={"k": "v"}, items=items, now=time.time())
    return conversation, _ids(items)


async def _version(store: ConversationStore, tenant: str, conversation_id: str) -> int:
    conversation = await store.get(tenant, conversation_id)
    assert conversation is not None
    return conversation.version


async def _page(
    store: ConversationStore, tenant: str, conversation_id: str, **kwargs: Any
) -> tuple[bool, list[str]]:
    page = await store.list_items(tenant, conversation_id, **kwargs)
    assert page is not None
    return page[0], _ids(page[1])


async def _turn(
    engine: AsyncEngine,
    store: ConversationStore,
    tenant: str,
    conversation_id: str,
    text: str,
    parent: str | None = None,
) -> StoredResponse:
    """One turn as the pipeline runs it: take the lock with the head, then write the response and append
    it at once."""
    now = time.time()
    response_id = ids.new_id(ids.RESPONSE)
    turns = TurnStore(engine, ResponseStore(engine), store)
    begun = await turns.begin(tenant, conversation_id, response_id, 30, now)
    assert begun is not None
    response = stored_response(
        tenant,
        id=response_id,
        previous_response_id=parent,
        conversation_id=conversation_id,
        output=output_items(f"re: {text}", None, []),
    )
    inputs = _messages(text)
    await turns.write(
        TurnWrite(response, now + 3600, inputs, response.output, None),
        ConversationAppend(conversation_id, begun[0].next_position, joins=True),
        opened=False,
    )
    return response


async def test_create_get_update_delete_and_tenants(engine: AsyncEngine) -> None:
    store, tenant = ConversationStore(engine), uuid.uuid4().hex
    conversation = await store.create(tenant, metadata={"a": "1"}, items=[], now=1234.5)
    assert conversation.id.startswith("conv_") and len(conversation.id) == 5 + 48
    fetched = await store.get(tenant, conversation.id)
    assert fetched == conversation
    assert (fetched.metadata, fetched.created_at, fetched.version, fetched.head_response_id) == (
        {"a": "1"},
        1234.5,
        0,
        None,
    )
    assert await store.get("other-tenant", conversation.id) is None
    assert await store.update_metadata("other-tenant", conversation.id, {}) is None
    updated = await store.update_metadata(tenant, conversation.id, {"b": "2"})
    assert updated is not None and updated.metadata == {"b": "2"} and updated.version == 0
    assert await store.get(tenant, conversation.id) == updated
    assert not await store.delete("other-tenant", conversation.id, time.time())
    assert await store.delete(tenant, conversation.id, time.time())
    assert await store.get(tenant, conversation.id) is None
    assert not await store.delete(tenant, conversation.id, time.time())
    assert await store.update_metadata(tenant, conversation.id, {}) is None
    assert not await store.add_items(tenant, conversation.id, _messages("x"), time.time())
    assert await store.list_items(tenant, conversation.id, after=None, limit=5, descending=False) is None
    assert await store.begin_turn(tenant, conversation.id, "resp_x", 30, time.time()) is None


async def test_items_in_order_with_pagination(engine: AsyncEngine) -> None:
    store, tenant = ConversationStore(engine), uuid.uuid4().hex
    conversation, initial = await _new(store, tenant, "m0", "m1")
    more = _messages("m2", "m3", "m4")
    assert await store.add_items(tenant, conversation.id, more, time.time())
    every = initial + _ids(more)
    assert await _page(store, tenant, conversation.id, after=None, limit=100, descending=False) == (
        False,
        every,
    )
    assert await _page(store, tenant, conversation.id, after=None, limit=2, descending=False) == (
        True,
        every[:2],
    )
    assert await _page(store, tenant, conversation.id, after=every[1], limit=2, descending=False) == (
        True,
        every[2:4],
    )
    assert await _page(store, tenant, conversation.id, after=every[3], limit=2, descending=False) == (
        False,
        every[4:],
    )
    assert await _page(store, tenant, conversation.id, after=None, limit=3, descending=True) == (
        True,
        every[::-1][:3],
    )
    assert await _page(store, tenant, conversation.id, after=every[2], limit=3, descending=True) == (
        False,
        every[1::-1],
    )
    assert await _page(store, tenant, conversation.id, after=every[0], limit=3, descending=True) == (
        False,
        [],
    )
    assert (
        await store.list_items("other-tenant", conversation.id, after=None, limit=5, descending=True) is None
    )
    empty, _ = await _new(store, tenant)
    assert await _page(store, tenant, empty.id, after=None, limit=5, descending=True) == (False, [])
    history = await store.history(tenant, conversation.id)
    assert [(output, _ids(items)) for output, items in history] == [(False, every)]
    assert await store.history("other-tenant", conversation.id) == []


async def test_get_and_delete_items(engine: AsyncEngine) -> None:
    store, tenant = ConversationStore(engine), uuid.uuid4().hex
    conversation, item_ids = await _new(store, tenant, "a", "b", "c")
    other, other_ids = await _new(store, tenant, "z")
    item = await store.get_item(tenant, conversation.id, item_ids[1])
    assert item is not None and item["content"][0]["text"] == "b"
    assert await store.get_item("other-tenant", conversation.id, item_ids[1]) is None
    with pytest.raises(NotFound) as missing:
        await store.get_item(tenant, conversation.id, other_ids[0])
    assert missing.value.param == "item_id"
    with pytest.raises(NotFound):
        await store.delete_item(tenant, conversation.id, other_ids[0], time.time())
    assert await store.delete_item("other-tenant", conversation.id, item_ids[1], time.time()) is None
    after = await store.delete_item(tenant, conversation.id, item_ids[1], time.time())
    assert after is not None and after.id == conversation.id and after.metadata == {"k": "v"}
    assert after.version == conversation.version + 1
    assert await _page(store, tenant, conversation.id, after=None, limit=10, descending=False) == (
        False,
        [item_ids[0], item_ids[2]],
    )
    with pytest.raises(NotFound):
        await store.get_item(tenant, conversation.id, item_ids[1])
    with pytest.raises(NotFound):
        await store.delete_item(tenant, conversation.id, item_ids[1], time.time())
    assert await _version(store, tenant, conversation.id) == after.version
    assert await _version(store, tenant, other.id) == 0
    assert await store.delete(tenant, conversation.id, time.time())
    assert await store.get_item(tenant, conversation.id, item_ids[0]) is None
    assert await store.delete_item(tenant, conversation.id, item_ids[0], time.time()) is None


async def test_turns_append_without_an_edit_and_deleting_their_items_detaches(engine: AsyncEngine) -> None:
    store, tenant = ConversationStore(engine), uuid.uuid4().hex
    conversation, initial = await _new(store, tenant, "hello")
    first = await _turn(engine, store, tenant, conversation.id, "q1")
    assert await _version(store, tenant, conversation.id) == 0
    added = _messages("note")
    assert await store.add_items(tenant, conversation.id, added, time.time())
    assert await _version(store, tenant, conversation.id) == 1
    second = await _turn(engine, store, tenant, conversation.id, "q2", parent=first.id)
    fetched = await store.get(tenant, conversation.id)
    assert fetched is not None and (fetched.version, fetched.head_response_id) == (1, second.id)

    history = await store.history(tenant, conversation.id)
    texts = [
        (output, [part["text"] for item in items for part in item["content"]]) for output, items in history
    ]
    assert texts == [
        (False, ["hello"]),
        (False, ["q1"]),
        (True, ["re: q1"]),
        (False, ["note"]),
        (False, ["q2"]),
        (True, ["re: q2"]),
    ]
    _, listed = await _page(store, tenant, conversation.id, after=None, limit=100, descending=False)
    assert listed == [item["id"] for _, items in history for item in items]

    # An item a response produced is detached, not deleted: the response keeps its output and history.
    produced = first.output[0]["id"]
    after = await store.delete_item(tenant, conversation.id, produced, time.time())
    assert after is not None and after.version == 2
    _, listed = await _page(store, tenant, conversation.id, after=None, limit=100, descending=False)
    assert produced not in listed
    with pytest.raises(NotFound):
        await store.get_item(tenant, conversation.id, produced)
    kept = await ResponseStore(engine).get(tenant, first.id)
    assert kept is not None and _ids(kept.output) == [produced]
    # A directly added item is really deleted; deleting the initial one leaves the turns in place.
    assert await store.delete_item(tenant, conversation.id, initial[0], time.time()) is not None
    assert await _version(store, tenant, conversation.id) == 3
    remaining = await store.history(tenant, conversation.id)
    assert [[item["content"][0]["text"] for item in items] for _, items in remaining] == [
        ["q1"],
        ["note"],
        ["q2"],
        ["re: q2"],
    ]


async def _release(engine: AsyncEngine, conversation_id: str, response_id: str, tenant: str) -> bool:
    async with unit_of_work(engine) as uow:
        return await ConversationStore(engine).release_turn(uow, tenant, conversation_id, response_id)


async def test_turn_lock(engine: AsyncEngine) -> None:
    store, tenant = ConversationStore(engine), uuid.uuid4().hex
    conversation, (first, _) = await _new(store, tenant, "a", "b")
    now = time.time()
    turn = await store.begin_turn(tenant, conversation.id, "resp_1", 30, now)
    assert turn is not None and (turn.version, turn.head_response_id, turn.next_position) == (0, None, 2)
    with pytest.raises(InvalidRequest) as locked:
        await store.begin_turn(tenant, conversation.id, "resp_2", 30, now + 1)
    assert (locked.value.code, locked.value.param) == ("conversation_locked", "conversation")
    assert conversation.id in locked.value.message
    assert await store.begin_turn("other-tenant", conversation.id, "resp_2", 30, now) is None
    assert await store.begin_turn(tenant, "conv_missing", "resp_2", 30, now) is None
    # While a turn runs its item list cannot change: nothing may land before the turn's input.
    for edit in (
        store.add_items(tenant, conversation.id, _messages("c"), now),
        store.delete_item(tenant, conversation.id, first, now),
    ):
        with pytest.raises(InvalidRequest) as refused:
            await edit
        assert refused.value.code == "conversation_locked"
    assert not await store.add_items("other-tenant", conversation.id, _messages("c"), now)

    assert not await _release(engine, conversation.id, "resp_2", tenant)
    assert await _release(engine, conversation.id, "resp_1", tenant)
    assert not await _release(engine, conversation.id, "resp_1", tenant)
    assert await store.add_items(tenant, conversation.id, _messages("c"), now)
    retaken = await store.begin_turn(tenant, conversation.id, "resp_2", 30, now)
    assert retaken is not None and (retaken.version, retaken.next_position) == (1, 3)

    # The holder's heartbeat moves the lease on; once it lapses, edits go through and another response
    # may take the lock over, and the stale holder can neither renew nor finish.
    assert await store.renew_turn(tenant, conversation.id, "resp_2", now + 40)
    with pytest.raises(InvalidRequest):
        await store.begin_turn(tenant, conversation.id, "resp_3", 30, now + 35)
    assert await store.add_items(tenant, conversation.id, _messages("d"), now + 41)
    taken = await store.begin_turn(tenant, conversation.id, "resp_3", 30, now + 41)
    assert taken is not None
    assert not await store.renew_turn(tenant, conversation.id, "resp_2", now + 80)
    with pytest.raises(InvalidRequest) as lost:
        async with unit_of_work(engine) as uow:
            await store.finish_turn(uow, tenant, conversation.id, "resp_2", [])
    assert lost.value.code == "conversation_locked"
    async with unit_of_work(engine) as uow:
        assert await store.finish_turn(uow, tenant, conversation.id, "resp_3", []) == 2
    fetched = await store.get(tenant, conversation.id)
    assert fetched is not None and fetched.head_response_id == "resp_3"
    assert await store.begin_turn(tenant, conversation.id, "resp_4", 30, now + 42) is not None


async def test_concurrent_turns_and_edits(engine: AsyncEngine) -> None:
    store, tenant = ConversationStore(engine), uuid.uuid4().hex
    conversation, _ = await _new(store, tenant, "a")
    now = time.time()
    outcomes = await asyncio.gather(
        *(store.begin_turn(tenant, conversation.id, f"resp_{i}", 30, now) for i in range(10)),
        return_exceptions=True,
    )
    assert sum(isinstance(outcome, ConversationTurn) for outcome in outcomes) == 1
    assert all(
        isinstance(outcome, ConversationTurn)
        or (isinstance(outcome, InvalidRequest) and outcome.code == "conversation_locked")
        for outcome in outcomes
    )
    (winner,) = [f"resp_{i}" for i, outcome in enumerate(outcomes) if isinstance(outcome, ConversationTurn)]
    assert await _release(engine, conversation.id, winner, tenant)
    batches = [_messages(f"b{i}-0", f"b{i}-1") for i in range(10)]
    assert all(await asyncio.gather(*(store.add_items(tenant, conversation.id, b, now) for b in batches)))
    _, listed = await _page(store, tenant, conversation.id, after=None, limit=100, descending=False)
    assert len(listed) == 21 and sorted(listed[1:]) == sorted(i for b in batches for i in _ids(b))
    # Each batch got a contiguous run of positions.
    for batch in batches:
        start = listed.index(batch[0]["id"])
        assert listed[start : start + 2] == _ids(batch)
    assert await _version(store, tenant, conversation.id) == 10


async def test_a_failed_finish_rolls_back_with_the_callers_transaction(engine: AsyncEngine) -> None:
    store, tenant = ConversationStore(engine), uuid.uuid4().hex
    conversation, _ = await _new(store, tenant, "a")
    assert await store.begin_turn(tenant, conversation.id, "resp_1", 30, time.time()) is not None
    with pytest.raises(RuntimeError):
        async with unit_of_work(engine) as uow:
            # The items were never written: nothing of the finish may stay.
            await store.finish_turn(uow, tenant, conversation.id, "resp_1", ["msg_never_written"])
    # The lock is still resp_1's, and no position was allocated.
    with pytest.raises(InvalidRequest):
        await store.begin_turn(tenant, conversation.id, "resp_2", 30, time.time())
    assert await _release(engine, conversation.id, "resp_1", tenant)
    turn = await store.begin_turn(tenant, conversation.id, "resp_2", 30, time.time())
    assert turn is not None and (turn.next_position, turn.head_response_id, turn.version) == (1, None, 0)


async def _counted(counter: StatementCounter, call: Awaitable[T]) -> tuple[int, T]:
    counter.reset()
    result = await call
    return counter.round_trips, result


async def test_round_trips_do_not_grow_with_the_conversation(engine: AsyncEngine) -> None:
    store, tenant = ConversationStore(engine), uuid.uuid4().hex
    counter = StatementCounter()
    try:
        counts: list[dict[str, int]] = []
        # The first pass prepares each statement on the connection (a round trip each), once.
        for length in (3, 3, 150):
            found: dict[str, int] = {}
            n, (conversation, item_ids) = await _counted(
                counter, _new(store, tenant, *(f"m{i}" for i in range(length)))
            )
            found["create"] = n
            found["get"], _ = await _counted(counter, store.get(tenant, conversation.id))
            found["update_metadata"], _ = await _counted(
                counter, store.update_metadata(tenant, conversation.id, {"x": "y"})
            )
            found["add_items"], _ = await _counted(
                counter, store.add_items(tenant, conversation.id, _messages("p", "q"), time.time())
            )
            found["list_items"], _ = await _counted(
                counter,
                store.list_items(tenant, conversation.id, after=item_ids[1], limit=20, descending=False),
            )
            found["get_item"], _ = await _counted(
                counter, store.get_item(tenant, conversation.id, item_ids[-1])
            )
            found["delete_item"], _ = await _counted(
                counter, store.delete_item(tenant, conversation.id, item_ids[-1], time.time())
            )
            found["history"], history = await _counted(counter, store.history(tenant, conversation.id))
            assert sum(len(items) for _, items in history) == length + 1
            found["begin_turn"], _ = await _counted(
                counter, store.begin_turn(tenant, conversation.id, "resp_a", 30, time.time())
            )
            found["release_turn"], _ = await _counted(
                counter, _release(engine, conversation.id, "resp_a", tenant)
            )
            found["turn"], _ = await _counted(counter, _turn(engine, store, tenant, conversation.id, "q"))
            found["delete"], _ = await _counted(counter, store.delete(tenant, conversation.id, time.time()))
            counts.append(found)
        assert counts[1] == counts[2]
        # Postgres: a transaction adds BEGIN and COMMIT; a turn is one read (lock + head) and one write.
        # SQLite: statements, each a call into the driver's thread; a turn's steps are separate there.
        transaction = 2 if engine.dialect.name == "postgresql" else 0
        assert counts[1] == {
            "create": 2 + transaction,
            "get": 1,
            "update_metadata": 1 + transaction,
            "add_items": 2 + transaction,
            "list_items": 1,
            "get_item": 1,
            "delete_item": 2 + transaction,
            "history": 1,
            "begin_turn": 1 + transaction,
            "release_turn": 1 + transaction,
            # SQLite: the lock; the response, its items, the conversation's head and the items' positions
            "turn": 2 if transaction else 1 + 4,
            "delete": 1 + transaction,
        }
    finally:
        counter.close()
