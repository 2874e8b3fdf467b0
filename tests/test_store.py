"""Store tests, on SQLite and on Postgres: history order, branching, round trips and statement counts."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from service.domain import ids
from service.domain.items import normalize_input
from service.domain.output import output_items
from service.store.db import StatementCounter, connections_in_use, create_engine, dispose, fetch
from service.store.responses import ResponseStore, StoredResponse, TurnWrite
from service.store.tenants import TenantStore
from service.store.unit import unit_of_work
from tests.factories import prefix_write, stored_response


async def _turn(
    store: ResponseStore, tenant: str, parent: StoredResponse | None, text: str, *, continues: bool = False
) -> StoredResponse:
    """A child of `parent`: a thread of its own, unless it `continues` the parent's."""
    now = time.time()
    response = stored_response(
        tenant,
        previous_response_id=parent.id if parent else None,
        depth=parent.depth + 1 if parent else 0,
        output=output_items(f"re: {text}", None, []),
    )
    if continues and parent is not None:
        response.thread = parent.thread
    await _write(
        store,
        TurnWrite(response, now + 3600, normalize_input(text), response.output, prefix_write(f"pc_{text}")),
    )
    return response


async def _write(store: ResponseStore, turn: TurnWrite) -> None:
    async with unit_of_work(store.engine) as uow:
        await store.write_turn(uow, turn)


def _texts(segments: list[tuple[bool, list[dict[str, Any]]]]) -> list[str]:
    return [part["text"] for _, segment in segments for item in segment for part in item["content"]]


async def test_history_is_ordered_and_branches_see_only_their_lineage(engine: AsyncEngine) -> None:
    store, tenant = ResponseStore(engine), uuid.uuid4().hex
    root = await _turn(store, tenant, None, "a")
    left = await _turn(store, tenant, root, "b")
    right = await _turn(store, tenant, root, "c")
    leaf = await _turn(store, tenant, left, "d")
    assert _texts(await store.history(tenant, leaf.id)) == ["a", "re: a", "b", "re: b", "d", "re: d"]
    assert _texts(await store.history(tenant, right.id)) == ["a", "re: a", "c", "re: c"]
    assert await store.history("someone-else", leaf.id) == []


async def test_parent_with_record_and_output_is_one_round_trip(engine: AsyncEngine) -> None:
    store, tenant = ResponseStore(engine), uuid.uuid4().hex
    root = await _turn(store, tenant, None, "a")
    counter = StatementCounter()
    try:
        parent = await store.load_parent(tenant, root.id)
        assert counter.count == 1
    finally:
        counter.close()
    assert parent is not None and parent.prefix is not None
    assert parent.prefix.handle_ref == "pc_a" and parent.prefix.covers_output is True
    assert [item["id"] for item in parent.response.output] == [item["id"] for item in root.output]
    assert await store.load_parent("other-tenant", root.id) is None


async def test_writing_and_rebuilding_do_not_grow_with_depth(engine: AsyncEngine) -> None:
    store, tenant = ResponseStore(engine), uuid.uuid4().hex
    counter = StatementCounter()
    try:
        counts: list[int] = []
        rebuild: list[int] = []
        turn = None
        for depth in range(200):
            counter.reset()
            turn = await _turn(store, tenant, turn, f"t{depth}")
            counts.append(counter.count)
            if depth in (1, 199):
                counter.reset()
                history = await store.history(tenant, turn.id)
                rebuild.append(counter.count)
                assert len(history) == 2 * (depth + 1)
        assert counts[1] == counts[199]
        assert rebuild == [1, 1]
    finally:
        counter.close()


async def test_delete_hides_but_keeps_lineage(engine: AsyncEngine) -> None:
    store, tenant = ResponseStore(engine), uuid.uuid4().hex
    root = await _turn(store, tenant, None, "a")
    child = await _turn(store, tenant, root, "b")
    assert await store.delete(tenant, root.id, time.time())
    assert await store.get(tenant, root.id) is None
    assert not await store.delete(tenant, root.id, time.time())
    assert _texts(await store.history(tenant, child.id)) == ["a", "re: a", "b", "re: b"]


async def test_input_items_pagination(engine: AsyncEngine) -> None:
    store, tenant = ResponseStore(engine), uuid.uuid4().hex
    now = time.time()
    items = normalize_input([{"role": "user", "content": f"m{i}"} for i in range(5)])
    response = stored_response(tenant)
    await _write(store, TurnWrite(response, now + 60, items, [], None))
    has_more, page = await store.input_items(tenant, response.id, after=None, limit=2, descending=False)  # type: ignore[misc]
    assert has_more and [item["id"] for item in page] == [items[0]["id"], items[1]["id"]]
    has_more, page = await store.input_items(
        tenant, response.id, after=items[3]["id"], limit=2, descending=False
    )  # type: ignore[misc]
    assert not has_more and [item["id"] for item in page] == [items[4]["id"]]
    has_more, page = await store.input_items(tenant, response.id, after=None, limit=5, descending=True)  # type: ignore[misc]
    assert not has_more and [item["id"] for item in page] == [item["id"] for item in reversed(items)]
    assert await store.input_items("x", response.id, after=None, limit=5, descending=True) is None


async def test_tenant_salt_is_stable_and_private(engine: AsyncEngine) -> None:
    tenant = "t-" + uuid.uuid4().hex
    first = await TenantStore(engine).cache_salt(tenant)
    assert len(first) == 64
    assert await TenantStore(engine).cache_salt(tenant) == first  # another process reads the same salt
    assert await TenantStore(engine).cache_salt("t-" + uuid.uuid4().hex) != first


async def test_turn_is_all_or_nothing(engine: AsyncEngine) -> None:
    store, tenant = ResponseStore(engine), uuid.uuid4().hex
    turn = await _turn(store, tenant, None, "x")
    duplicate = StoredResponse(
        **{**{k: getattr(turn, k) for k in StoredResponse.__slots__}, "id": ids.new_id("resp")}
    )
    # The items collide with the first turn's ids: the whole turn must roll back.
    with pytest.raises(IntegrityError):
        await _write(store, TurnWrite(duplicate, time.time() + 60, [], turn.output, prefix_write()))
    assert await store.get(tenant, duplicate.id) is None


async def _statement_cost(
    engine: AsyncEngine, matching: list[str], not_matching: list[str] | None = None
) -> tuple[int, int]:
    """Calls, and buffers touched (hit or read), of the statements pg_stat_statements recorded on the
    engine's database since its last reset whose text is LIKE every one of `matching` and none of
    `not_matching`."""
    async with engine.connect() as conn:
        calls, blocks = (
            await conn.execute(
                text(
                    "SELECT sum(calls), sum(shared_blks_hit + shared_blks_read) FROM pg_stat_statements"
                    " WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())"
                    " AND query LIKE ALL(:matching) AND NOT query LIKE ANY(:not_matching)"
                ),
                {"matching": matching, "not_matching": not_matching or []},
            )
        ).one()
    return int(calls), int(blocks)


async def test_the_history_reads_its_own_items_not_the_table(pg_engine: AsyncEngine) -> None:
    """On Postgres the history walks its lineage's threads and reads each thread's items by index: the
    buffers it touches follow the history, not the size of the items table (joined, Postgres scanned all
    of it)."""
    store, tenant = ResponseStore(pg_engine), uuid.uuid4().hex
    leaf = None
    for word in ("a", "b", "c"):
        leaf = await _turn(store, tenant, leaf, word, continues=True)
    assert leaf is not None
    async with pg_engine.connect() as conn:
        # Other turns: 1,500 responses of two items each.
        await conn.execute(
            text(
                "INSERT INTO responses (id, tenant, model, status, depth, settings, store, background,"
                " cancel_requested, created_at, expires_at, thread)"
                " SELECT :tenant || g, :tenant, 'm', 'completed', 0, '{}', true, false, false, 0, 1e12,"
                " :tenant || g"
                " FROM generate_series(1, 1500) g"
            ),
            {"tenant": tenant},
        )
        await conn.execute(
            text(
                "INSERT INTO items (id, tenant, response_id, segment, position, type, payload, created_at,"
                " thread, depth)"
                " SELECT :tenant || g || '.' || s, :tenant, :tenant || g, s, 0, 'message',"
                " jsonb_build_object('text', repeat('x', 200)), 0, :tenant || g, 0"
                " FROM generate_series(1, 1500) g, generate_series(0, 1) s"
            ),
            {"tenant": tenant},
        )
        await conn.execute(text("ANALYZE responses, items"))
        pages = (
            await conn.execute(text("SELECT relpages FROM pg_class WHERE relname = 'items'"))
        ).scalar_one()
        await conn.execute(text("CREATE EXTENSION IF NOT EXISTS pg_stat_statements"))
        await conn.execute(text("SELECT pg_stat_statements_reset()"))
        await conn.commit()
    for _ in range(2):
        assert _texts(await store.history(tenant, leaf.id)) == ["a", "re: a", "b", "re: b", "c", "re: c"]
    calls, blocks = await _statement_cost(pg_engine, ["%WITH RECURSIVE threads%"], ["%invalidations%"])
    assert calls == 2 and pages >= 40
    assert blocks / calls < 30, (blocks, pages)


async def test_input_items_cost_does_not_grow_with_depth(pg_engine: AsyncEngine) -> None:
    """A page of a response's input items is one statement whose work in Postgres (the buffers it
    touches) is the same at depth 200 as at depth 20, in either order, from the start or from a cursor:
    a range of an index per thread, read from the page's place on. A walk of the chain an ancestor at a
    time was one statement too, but touched nine times as many buffers at depth 200 as at depth 20."""
    store, tenant = ResponseStore(pg_engine), uuid.uuid4().hex
    leaves: dict[int, StoredResponse] = {}
    turn = None
    for depth in range(201):
        turn = await _turn(store, tenant, turn, f"t{depth}", continues=True)
        if depth in (20, 200):
            leaves[depth] = turn
    async with pg_engine.connect() as conn:
        await conn.execute(text("CREATE EXTENSION IF NOT EXISTS pg_stat_statements"))
        await conn.commit()

    async def page(response: StoredResponse, **query: Any) -> tuple[int, int]:
        """The statements of one page (of 10, with more listed) and the buffers Postgres touched for it."""
        async with pg_engine.connect() as conn:
            await conn.execute(text("SELECT pg_stat_statements_reset()"))
            await conn.commit()
        counter = StatementCounter()
        try:
            found = await store.input_items(tenant, response.id, limit=10, **query)
        finally:
            counter.close()
        assert found is not None and found[0] and len(found[1]) == 10
        # The listing's statement walks the lineage and reads conversation positions; no other does.
        calls, blocks = await _statement_cost(pg_engine, ["%WITH RECURSIVE%", "%conversation_position%"])
        assert calls == counter.count
        return counter.count, int(blocks)

    costs: dict[str, dict[int, tuple[int, int]]] = {}
    for depth, leaf in leaves.items():
        listed = await store.input_items(tenant, leaf.id, after=None, limit=100, descending=False)
        assert listed is not None
        middle = listed[1][20]["id"]  # a cursor with pages on both sides
        for name, query in {
            "newest": {"after": None, "descending": True},
            "oldest": {"after": None, "descending": False},
            "after": {"after": middle, "descending": False},
            "before": {"after": middle, "descending": True},
        }.items():
            costs.setdefault(name, {})[depth] = await page(leaf, **query)
    for name, (shallow, deep) in ((name, (by[20], by[200])) for name, by in costs.items()):
        assert shallow[0] == deep[0] == 1, (name, costs)
        assert deep[1] <= shallow[1] + 2, (name, costs)


async def test_connections_in_use_count_both_pools(pg_engine: AsyncEngine) -> None:
    """The pool gauge operators size pools by sees the turns' statement pool as well as SQLAlchemy's."""
    assert connections_in_use(pg_engine) == 0
    running = asyncio.ensure_future(fetch(pg_engine, "SELECT pg_sleep(0.5)"))
    await asyncio.sleep(0.2)
    async with pg_engine.connect():
        assert connections_in_use(pg_engine) == 2
    await running
    assert connections_in_use(pg_engine) == 0


# The statement pool: one connection (a pool_size of 1 leaves it one), so which connection served a
# statement shows in the server's process id.
_BACKEND_PID = "SELECT pg_backend_pid()"


async def _served_by(engine: AsyncEngine, sql: str = _BACKEND_PID) -> int:
    return int((await fetch(engine, sql))[0][0])


@asynccontextmanager
async def _one_connection(url: str, pool_timeout: float = 30.0) -> AsyncIterator[AsyncEngine]:
    """An engine whose statement pool has one connection; none is left in use at the end."""
    engine = create_engine(url, pool_size=1, pool_timeout=pool_timeout)
    try:
        yield engine
        assert connections_in_use(engine) == 0
    finally:
        await dispose(engine)


async def test_statement_pool_keeps_a_connection_whose_statement_the_server_refused(
    migrated_urls: dict[str, str],
) -> None:
    async with _one_connection(migrated_urls["postgres"]) as engine:
        before = await _served_by(engine)
        with pytest.raises(asyncpg.DivisionByZeroError):
            await fetch(engine, "SELECT 1 / 0")
        assert await _served_by(engine) == before


async def test_statement_pool_closes_a_connection_whose_statement_was_cancelled(
    migrated_urls: dict[str, str],
) -> None:
    """A cancelled statement leaves its connection mid-exchange: a new one serves the next caller, who
    was waiting for the only slot."""
    async with _one_connection(migrated_urls["postgres"]) as engine:
        before = await _served_by(engine)
        cancelled = asyncio.ensure_future(fetch(engine, "SELECT pg_sleep(10)"))
        await asyncio.sleep(0.2)
        waiting = asyncio.ensure_future(_served_by(engine))
        await asyncio.sleep(0.1)
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        assert await asyncio.wait_for(waiting, 5) != before


async def test_statement_pool_hands_its_connection_to_each_waiting_caller_in_turn(
    migrated_urls: dict[str, str],
) -> None:
    async with _one_connection(migrated_urls["postgres"]) as engine:
        served = await asyncio.gather(
            *(_served_by(engine, "SELECT pg_backend_pid() FROM pg_sleep(0.05)") for _ in range(4))
        )
        assert len(set(served)) == 1


async def test_statement_pool_gives_up_on_a_wait_after_the_pool_timeout(
    migrated_urls: dict[str, str],
) -> None:
    async with _one_connection(migrated_urls["postgres"], pool_timeout=0.2) as engine:
        busy = asyncio.ensure_future(fetch(engine, "SELECT pg_sleep(0.6)"))
        await asyncio.sleep(0.1)
        with pytest.raises(TimeoutError):
            await fetch(engine, "SELECT 1")
        await busy
        # The caller that gave up left nothing behind: the connection goes to the next caller.
        assert await _served_by(engine) > 0
