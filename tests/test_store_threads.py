"""Threads (service/domain/threads.py) through the turn's own store, on SQLite and on Postgres: the history
read a thread at a time equals the one found by following previous_response_id one response at a time,
over random forests of chains with forks; a turn chooses its thread from its parent's read, so its write
is never retried unless a sibling raced it; and two racing children both land, in different threads."""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from dataclasses import dataclass, replace
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from service.domain import ids
from service.domain.items import normalize_input
from service.domain.output import output_items
from service.domain.threads import choose_thread
from service.store.conversations import ConversationStore
from service.store.db import StatementCounter
from service.store.responses import ParentTurn, ResponseStore, StoredResponse, TurnWrite
from service.store.turns import TurnStore
from tests.factories import prefix_write, stored_response

SEEDS = range(4)
RESPONSES = 60


@dataclass(frozen=True, slots=True)
class Written:
    response: StoredResponse
    input_ids: list[str]
    output_ids: list[str]

    @classmethod
    def of(cls, response: StoredResponse, turn: TurnWrite) -> Written:
        return cls(response, [i["id"] for i in turn.input_items], [o["id"] for o in turn.output_items])


def _turns(engine: AsyncEngine) -> TurnStore:
    return TurnStore(engine, ResponseStore(engine), ConversationStore(engine))


def _child(tenant: str, parent: ParentTurn | None, text: str) -> TurnWrite:
    """A finished turn continuing `parent`, with its thread chosen as the pipeline chooses it."""
    response_id = ids.new_id(ids.RESPONSE)
    response = stored_response(
        tenant,
        id=response_id,
        previous_response_id=parent.response.id if parent else None,
        depth=parent.response.depth + 1 if parent else 0,
        lineage_root=parent.response.lineage_root if parent else response_id,
        thread=choose_thread(
            response_id,
            parent.response.thread if parent else None,
            parent_thread_taken=parent.thread_taken if parent else False,
        ),
        output=output_items(f"re: {text}", None, []),
    )
    inputs = normalize_input([{"role": "user", "content": f"{text} {i}"} for i in range(1 + len(text) % 3)])
    return TurnWrite(response, time.time() + 3600, inputs, response.output, prefix_write("pc"))


async def _store(turns: TurnStore, turn: TurnWrite, *, opened: bool) -> tuple[StoredResponse, list[int]]:
    """Store a turn as the pipeline does: whole, or (`opened`, a streamed or background turn) its row and
    input first, then its output. The response as stored, and the statements of each write."""
    counter = StatementCounter()
    try:
        if not opened:
            thread = await turns.write(turn, None, opened=False)
            return replace(turn.response, thread=thread), [counter.count]
        running = replace(turn.response, status="in_progress", completed_at=None, output=[])
        thread = await turns.open(TurnWrite(running, turn.expires_at, turn.input_items, [], None), 1e12)
        opening = counter.count
        counter.reset()
        done = replace(turn.response, thread=thread)
        await turns.write(replace(turn, response=done), None, opened=True)
        return done, [opening, counter.count]
    finally:
        counter.close()


def _followed(written: dict[str, Written], response_id: str) -> list[tuple[bool, list[str]]]:
    """The oracle: the history found by following previous_response_id one response at a time."""
    lineage: list[Written] = []
    at: str | None = response_id
    while at is not None:
        lineage.append(written[at])
        at = written[at].response.previous_response_id
    return [
        segment
        for turn in reversed(lineage)
        for segment in ((False, turn.input_ids), (True, turn.output_ids))
        if segment[1]
    ]


def _read(history: list[tuple[bool, list[dict[str, Any]]]]) -> list[tuple[bool, list[str]]]:
    return [(is_output, [item["id"] for item in items]) for is_output, items in history]


@pytest.mark.parametrize("seed", SEEDS)
async def test_a_forest_reads_as_following_previous_response_id(engine: AsyncEngine, seed: int) -> None:
    """Random forests: several roots, straight runs, several children of one parent, forks of forks,
    whole and opened writes. Every response's history equals the oracle's; a response continues its
    parent's thread exactly when it is the parent's first child; and no write was retried (each costs
    what a root's costs): the thread was chosen from the parent's read."""
    rng = random.Random(seed)
    turns, tenant = _turns(engine), uuid.uuid4().hex
    written: dict[str, Written] = {}
    order: list[str] = []
    first_children: set[str] = set()
    costs: dict[bool, set[tuple[int, ...]]] = {False: set(), True: set()}
    for n in range(RESPONSES):
        roll = rng.random()
        parent_id = (
            None
            if not order or roll < 0.1
            else rng.choice(order)
            if roll < 0.45  # a fork, mostly
            else order[-1]  # a straight run
        )
        parent = await turns.load_parent(tenant, parent_id, time.time()) if parent_id else None
        turn = _child(tenant, parent, f"t{n}")
        opened = rng.random() < 0.25
        response, cost = await _store(turns, turn, opened=opened)
        costs[opened].add(tuple(cost))
        written[response.id] = Written.of(response, turn)
        order.append(response.id)
        if parent_id is not None and parent_id not in first_children:
            first_children.add(parent_id)
            assert response.thread == written[parent_id].response.thread
        else:
            assert response.thread == response.id
    forks = sum(1 for turn in written.values() if turn.response.thread == turn.response.id)
    assert forks > 3 and max(turn.response.depth for turn in written.values()) > 8
    assert all(len(kind) <= 1 for kind in costs.values()), costs
    store = ResponseStore(engine)
    for response_id in order:
        assert _read(await store.history(tenant, response_id)) == _followed(written, response_id)


@pytest.mark.parametrize("opened", [False, True], ids=["whole", "opened"])
async def test_two_racing_children_both_land_in_different_threads(engine: AsyncEngine, opened: bool) -> None:
    """Both children read the parent's thread as free; the one that writes second is refused by the
    unique index and written once more as a thread of its own."""
    turns, tenant = _turns(engine), uuid.uuid4().hex
    root_turn = _child(tenant, None, "root")
    root, _ = await _store(turns, root_turn, opened=False)
    written = {root.id: Written.of(root, root_turn)}
    parent = await turns.load_parent(tenant, root.id, time.time())
    assert parent is not None and not parent.thread_taken
    children = [_child(tenant, parent, text) for text in ("left", "right")]
    assert {child.response.thread for child in children} == {root.thread}
    stored = await asyncio.gather(*(_store(turns, child, opened=opened) for child in children))
    (winner, won), (loser, lost) = sorted(stored, key=lambda pair: pair[0].thread != root.thread)
    assert winner.thread == root.thread and loser.thread == loser.id
    # The loser's insert was refused (nothing of it written) and made once more.
    assert lost[0] > won[0]
    for (response, _), child in zip(stored, children, strict=True):
        written[response.id] = Written.of(response, child)
    store = ResponseStore(engine)
    for response_id in written:
        assert _read(await store.history(tenant, response_id)) == _followed(written, response_id)
    again = await turns.load_parent(tenant, root.id, time.time())
    assert again is not None and again.thread_taken


async def test_input_items_after_a_fork_page_through_their_own_lineage_only(engine: AsyncEngine) -> None:
    """A chain that forks, and forks again: the thread a fork left goes on past the fork point, at the
    depths of the fork's own turns. Each response's input_items, paged with every limit in both orders,
    are its parent's history then its own input, as following previous_response_id finds them; has_more
    holds exactly while items remain; a cursor from another branch is not in the listing."""
    turns, tenant = _turns(engine), uuid.uuid4().hex
    written: dict[str, Written] = {}

    async def add(parent: StoredResponse | None, text: str) -> StoredResponse:
        read = await turns.load_parent(tenant, parent.id, time.time()) if parent else None
        turn = _child(tenant, read, text)
        response, _ = await _store(turns, turn, opened=False)
        written[response.id] = Written.of(response, turn)
        return response

    root = await add(None, "root")
    a1 = await add(root, "a1")
    a3 = await add(await add(a1, "a2"), "a3")
    f2 = await add(a1, "f2")
    f3 = await add(f2, "f3")
    g4 = await add(await add(f2, "g3"), "g4")
    assert len({root.thread, f2.thread, g4.thread}) == 3
    assert (a3.thread, f3.thread) == (root.thread, f2.thread)  # both threads go on past a fork
    store = ResponseStore(engine)
    for leaf in (a3, f3, g4):
        parent = leaf.previous_response_id
        assert parent is not None
        listed = [item for _, ids in _followed(written, parent) for item in ids] + written[leaf.id].input_ids
        for descending in (False, True):
            expected = listed[::-1] if descending else listed
            for limit in range(1, len(expected) + 2):
                got: list[str] = []
                after = None
                while True:
                    page = await store.input_items(
                        tenant, leaf.id, after=after, limit=limit, descending=descending
                    )
                    assert page is not None
                    has_more, items = page
                    got += [item["id"] for item in items]
                    assert has_more == (len(got) < len(expected)), (leaf.id, descending, limit, got)
                    if not has_more:
                        break
                    after = got[-1]
                assert got == expected, (descending, limit)
    elsewhere = written[a3.id].input_ids[0]
    assert await store.input_items(tenant, g4.id, after=elsewhere, limit=5, descending=False) == (False, [])
