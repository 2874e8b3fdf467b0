"""Responses, their items and prefix records.

Round trips are fixed whatever the depth of the conversation: the parent with its prefix record and
output items is one query, the history (full path only) is one query that reads a range of the items
index per thread of the lineage (service/domain/threads.py), and writing a turn is one transaction of
three inserts. On Postgres a turn's own read and write go through store/turns.py instead
(one statement each); the statements here are SQLite's, and every other reader's and writer's. A
streamed or background turn's row is inserted first (in progress, with a lease its runner renews) and
moved on to its final status by one conditional UPDATE with its output and prefix record; the reaper and
cancel are conditional UPDATEs too, so of two racing writers exactly one wins and the other learns it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from sqlalchemy import (
    CTE,
    ColumnElement,
    FromClause,
    Integer,
    Select,
    and_,
    bindparam,
    case,
    insert,
    literal_column,
    or_,
    select,
    true,
    tuple_,
    union_all,
    update,
)
from sqlalchemy.dialects.postgresql.asyncpg import dialect as asyncpg_dialect
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.orm import InstrumentedAttribute, aliased

from service.observe import db_call
from service.store.db import autocommit, fetch
from service.store.models import INPUT_SEGMENT, OUTPUT_SEGMENT, Item, PrefixRecord, Response
from service.store.unit import UnitOfWork

ItemPayload = dict[str, Any]


@dataclass(slots=True)
class StoredResponse:
    id: str
    tenant: str
    model: str
    status: str
    previous_response_id: str | None
    conversation_id: str | None
    depth: int
    instructions: str | None
    settings: dict[str, Any]
    usage: dict[str, Any] | None
    error: dict[str, Any] | None
    incomplete_details: dict[str, Any] | None
    store: bool
    background: bool
    created_at: float
    completed_at: float | None
    lineage_root: str | None
    # The first response of its thread (service/domain/threads.py).
    thread: str
    # In a conversation: the conversation's length when the turn began (its history is the items before).
    conversation_start: int | None = None
    output: list[ItemPayload] = field(default_factory=list)


@dataclass(slots=True)
class StoredPrefix:
    status: str
    fingerprint_parts: dict[str, Any]
    handle_ref: str | None
    handle_epoch: str | None
    handle_expires_at: float | None
    backend_fingerprint: str | None
    safe_tokens: int | None
    prefix_hash: str | None
    covers_output: bool | None
    conversation_version: int | None
    created_at: float
    session_token: str | None


@dataclass(slots=True)
class ParentTurn:
    response: StoredResponse
    prefix: StoredPrefix | None
    # Another child already continues the parent's thread: a new child starts one of its own.
    thread_taken: bool = False


@dataclass(slots=True)
class PrefixWrite:
    status: str
    decision_path: str
    decision_reason: str
    prompt_tokens: int | None
    prompt_digest: str | None
    cached_tokens: int | None
    reused_tokens: int | None
    bytes_sent: int
    turn_tokens: int | None
    safe_boundary: bool | None
    safe_tokens: int | None
    prefix_hash: str | None
    covers_output: bool | None
    fingerprint: str | None
    backend_fingerprint: str | None
    fingerprint_parts: dict[str, Any]
    handle_ref: str | None
    handle_endpoint: str | None
    handle_epoch: str | None
    handle_expires_at: float | None
    conversation_version: int | None
    session_token: str | None = None


@dataclass(slots=True)
class TurnWrite:
    response: StoredResponse
    expires_at: float
    input_items: Sequence[ItemPayload]
    output_items: Sequence[ItemPayload]
    prefix: PrefixWrite | None


@dataclass(slots=True, frozen=True)
class Reaped:
    """A response the reaper finalized, and the conversation whose lock it may still hold."""

    id: str
    conversation_id: str | None


RESPONSE_COLUMNS = (
    Response.id,
    Response.tenant,
    Response.model,
    Response.status,
    Response.previous_response_id,
    Response.conversation_id,
    Response.depth,
    Response.instructions,
    Response.settings,
    Response.usage,
    Response.error,
    Response.incomplete_details,
    Response.store,
    Response.background,
    Response.created_at,
    Response.completed_at,
    Response.lineage_root,
    Response.thread,
    Response.conversation_start,
)
PREFIX_COLUMNS = (
    PrefixRecord.status,
    PrefixRecord.fingerprint_parts,
    PrefixRecord.handle_ref,
    PrefixRecord.handle_epoch,
    PrefixRecord.handle_expires_at,
    PrefixRecord.backend_fingerprint,
    PrefixRecord.safe_tokens,
    PrefixRecord.prefix_hash,
    PrefixRecord.covers_output,
    PrefixRecord.conversation_version,
    PrefixRecord.created_at,
    PrefixRecord.session_token,
)
_N_RESPONSE = len(RESPONSE_COLUMNS)
_N_PREFIX = len(PREFIX_COLUMNS)


def _live_response(tenant: str, response_id: str, now: float) -> Any:
    """The tenant's response, unless deleted or expired (expired ones are gone at once, before the
    retention worker deletes their rows)."""
    return and_(
        Response.id == response_id,
        Response.tenant == tenant,
        Response.deleted_at.is_(None),
        Response.expires_at > now,
    )


def _response_with_output(*extra: Any) -> Select[Any]:
    """Response columns, `extra` columns, then its output items (one row per item, or one NULL row)."""
    return (
        select(*RESPONSE_COLUMNS, *extra, Item.payload)
        .select_from(Response)
        .outerjoin(Item, and_(Item.response_id == Response.id, Item.segment == OUTPUT_SEGMENT))
        .order_by(Item.position)
    )


# The hot path's statements are built once: constructing a query and looking it up in SQLAlchemy's
# compiled cache on every call cost a fifth of a turn's CPU.
_LIVE_BY_ID = and_(
    Response.id == bindparam("response_id"),
    Response.tenant == bindparam("tenant"),
    Response.deleted_at.is_(None),
    Response.expires_at > bindparam("now"),
    Response.store.is_(True),
)
# Whether a response already continues the parent's thread (the unique index on thread and depth): the
# turn's own choice of thread is made on this, so the write's retry is only for a race.
_NEXT_IN_THREAD = aliased(Response, name="next_in_thread")
_THREAD_TAKEN = (
    select(literal_column("1"))
    .where(_NEXT_IN_THREAD.thread == Response.thread, _NEXT_IN_THREAD.depth == Response.depth + 1)
    .exists()
)
_PARENT = (
    _response_with_output(*PREFIX_COLUMNS, _THREAD_TAKEN)
    .outerjoin(PrefixRecord, PrefixRecord.response_id == Response.id)
    .where(_LIVE_BY_ID)
)
_RESPONSE = _response_with_output().where(_LIVE_BY_ID)
_EXISTS: Select[Any] = select(literal_column("1")).where(_LIVE_BY_ID)


def _threads(start: Select[str, int], *, lookup: bool) -> CTE:
    """The threads of a lineage (service/domain/threads.py), as (thread, depth) rows: `start`'s row (a
    response's thread and depth), then the thread and depth of the parent of each thread's first response
    (whose id is the thread), and so on: one row per thread, k + 1 for a lineage with k forks. With
    `lookup` (Postgres), each step is an index lookup of its own (LATERAL, with LIMIT so Postgres cannot
    flatten it into a join): left to plain joins, Postgres may hash a scan of the whole table."""
    threads = start.cte("threads", recursive=True)
    first, parent = aliased(Response, name="first"), aliased(Response, name="parent")
    if not lookup:
        return threads.union_all(
            select(parent.thread, parent.depth)
            .select_from(threads)
            .join(first, first.id == threads.c.thread)
            .join(parent, parent.id == first.previous_response_id)
        )
    previous = (
        select(first.previous_response_id)
        .where(first.id == threads.c.thread)
        .correlate_except(first)
        .scalar_subquery()
    )
    step = select(parent.thread, parent.depth).where(parent.id == previous).limit(literal_column("1"))
    walked = step.lateral("step")
    return threads.union_all(select(*walked.c).select_from(threads).join(walked, true()))


def _in_thread(threads: CTE) -> ColumnElement[bool]:
    """A walked thread's items in the lineage: those up to its depth, one range of ix_items_thread."""
    return and_(Item.thread == threads.c.thread, Item.depth <= threads.c.depth)


def _history(*, lookup: bool) -> Select[Any]:
    """The items of a lineage in history order, read a thread at a time (`_threads`): from
    `response_id`, its thread's items up to its depth; then, from the parent of its thread's first
    response, that parent's thread's items up to the parent's depth; and so on. Depths only grow along a
    lineage, so (depth, segment, position) is history order. A straight chain is one range of
    ix_items_thread, a history with k forks k + 1 ranges and a walk of k steps. With `lookup` (Postgres),
    each range is an index lookup of its own (LATERAL, with ORDER BY so Postgres cannot flatten it)."""
    start = select(Response.thread, Response.depth).where(
        Response.id == bindparam("response_id"), Response.tenant == bindparam("tenant")
    )
    threads = _threads(start, lookup=lookup)
    order = (Item.depth, Item.segment, Item.position)
    if not lookup:
        return (
            select(Item.response_id, Item.segment, Item.payload)
            .join(threads, _in_thread(threads))
            .order_by(*order)
        )
    own = (
        select(Item.response_id, Item.segment, Item.payload, Item.depth, Item.position)
        .where(_in_thread(threads))
        .order_by(*order)
        .lateral("own")
    )
    return (
        select(own.c.response_id, own.c.segment, own.c.payload)
        .select_from(threads)
        .join(own, true())
        .order_by(own.c.depth, own.c.segment, own.c.position)
    )


@dataclass(frozen=True, slots=True)
class _Part:
    """A part of an input_items listing: its number (the listing's first key), the FROM its range hangs
    off, the range, and the keys that order it, in the index's order."""

    number: int
    outer: FromClause
    where: ColumnElement[bool]
    keys: tuple[InstrumentedAttribute[Any], ...]


def _input_items(*, lookup: bool, descending: bool, after: bool) -> Select[Any]:
    """A page of the items a response was generated from (`ResponseStore.input_items`), read in three
    parts, each a range of an index: in a conversation, its items before the turn (ix_items_conversation);
    the history of the response's parent, a range of ix_items_thread per thread, walked as the turn's own
    history read walks it (`_threads`); the response's own input (ix_items_thread). Listing order is
    (part, keys): 0 and the conversation position, or 1 and (depth, segment, position), history order.

    With `after`, the page starts past that item when it is in the listing (else the page is empty): its
    key, mapped into each part's own terms, bounds that part's range, so a page reads from its place in
    the index on. With `lookup` (Postgres), each range is a LATERAL index lookup with its own ORDER BY and
    LIMIT: a page reads at most `limit` rows of each range, whatever the depth. Parameters: response_id,
    tenant, now, limit and, with `after`, after."""
    start = (
        select(
            Response.previous_response_id,
            Response.thread,
            Response.depth,
            Response.conversation_id,
            Response.conversation_start,
        )
        .where(_LIVE_BY_ID)
        .cte("start")
    )
    parent = (
        select(Response.thread, Response.depth)
        .select_from(start)
        .join(Response, Response.id == start.c.previous_response_id)
    )
    threads = _threads(parent, lookup=lookup)
    earlier = and_(
        Item.conversation_id == start.c.conversation_id,
        Item.conversation_position < start.c.conversation_start,
        Item.tenant == bindparam("tenant"),
    )
    own = and_(Item.thread == start.c.thread, Item.depth == start.c.depth, Item.segment == INPUT_SEGMENT)
    history_keys = (Item.depth, Item.segment, Item.position)
    parts = [
        _Part(0, start, earlier, (Item.conversation_position,)),
        _Part(1, threads, _in_thread(threads), history_keys),
        _Part(1, start, own, history_keys),
    ]
    if after:
        # The cursor item, if listed. A conversation item (part 0) is before every item of part 1, whose
        # bound is then a depth below all; an item of part 1 is after every conversation item, whose
        # bound is then the conversation's start, above all of them.
        in_lineage = select(literal_column("1")).where(_in_thread(threads)).exists()
        cursor = (
            select(
                case((earlier, Item.conversation_position), else_=start.c.conversation_start).label("at"),
                case((earlier, literal_column("-1")), else_=Item.depth).label("depth"),
                Item.segment,
                Item.position,
            )
            .select_from(start)
            .join(Item, Item.id == bindparam("after"))
            .where(or_(earlier, in_lineage, own))
            .cte("cursor")
        )
        # Bounds as scalar subqueries (NULL, so no rows, when the cursor is not listed), not a join:
        # joined, SQLite may plan the cursor first and index the whole items table to meet it.
        at, depth, segment, position = (select(column).scalar_subquery() for column in cursor.c)
        bounds = {0: (at,), 1: (depth, segment, position)}
        parts = [
            replace(part, where=and_(part.where, _past(part.keys, bounds[part.number], descending)))
            for part in parts
        ]
    arms = []
    for n, part in enumerate(parts):
        # Every part's keys as three columns, for one ORDER BY over their union.
        keys = (*part.keys, *(literal_column("0") for _ in range(3 - len(part.keys))))
        columns = (Item.payload.label("payload"), *(key.label(f"k{i}") for i, key in enumerate(keys)))
        number = literal_column(str(part.number), Integer).label("part")
        if not lookup:
            arms.append(select(number, *columns).select_from(part.outer).join(Item, part.where))
            continue
        found = (
            select(*columns)
            .where(part.where)
            .order_by(*(key.desc() if descending else key for key in part.keys))
            .limit(bindparam("limit"))
            .lateral(f"part_{n}")
        )
        arms.append(select(number, *found.c).select_from(part.outer).join(found, true()))
    page = union_all(*arms).subquery("page")
    order = (page.c.part, page.c.k0, page.c.k1, page.c.k2)
    return (
        select(page.c.payload)
        .order_by(*(column.desc() if descending else column for column in order))
        .limit(bindparam("limit"))
    )


def _past(
    keys: Sequence[InstrumentedAttribute[Any]], bound: Sequence[ColumnElement[Any]], descending: bool
) -> ColumnElement[bool]:
    """Keys past a bound in listing order. Several keys: a row comparison, and the first key's bound
    alone beside it. Postgres starts a range at the tighter of two plain bounds of a column, but cannot
    weigh a row comparison against the plain bound of a thread's depth: without it, a page before a
    cursor would scan the thread's index entries from its end down to the cursor."""
    if len(keys) == 1:
        return keys[0] < bound[0] if descending else keys[0] > bound[0]
    row, cursor = tuple_(*keys), tuple_(*bound)
    if descending:
        return and_(keys[0] <= bound[0], row < cursor)
    return and_(keys[0] >= bound[0], row > cursor)


# Run on the driver (store/db.py `fetch`): a deep history is hundreds of rows, and a result layer costs
# per row. Its parameters, in order: response_id, tenant.
_HISTORY_ASYNCPG = str(_history(lookup=True).compile(dialect=asyncpg_dialect()))  # type: ignore[no-untyped-call]
_HISTORY_BY_JOIN = _history(lookup=False)
# Built once, by (lookup, descending, after).
_INPUT_ITEMS = {
    (lookup, descending, after): _input_items(lookup=lookup, descending=descending, after=after)
    for lookup in (False, True)
    for descending in (False, True)
    for after in (False, True)
}
_INSERT_RESPONSE = insert(Response)
_INSERT_ITEMS = insert(Item)
_INSERT_PREFIX = insert(PrefixRecord)


def _to_response(row: Sequence[Any]) -> StoredResponse:
    return StoredResponse(*row[:_N_RESPONSE])


class ResponseStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self._reads = autocommit(engine)
        self._postgres = engine.dialect.name == "postgresql"

    @db_call
    async def load_parent(self, tenant: str, response_id: str) -> ParentTurn | None:
        """The parent response, its prefix record, its output items and whether its thread is taken:
        one round trip."""
        found = await self._with_output(_PARENT, tenant, response_id)
        if found is None:
            return None
        response, first_row = found
        prefix_values = first_row[_N_RESPONSE : _N_RESPONSE + _N_PREFIX]
        prefix = None if prefix_values[0] is None else StoredPrefix(*prefix_values)
        return ParentTurn(response, prefix, thread_taken=first_row[_N_RESPONSE + _N_PREFIX])

    @db_call
    async def get(self, tenant: str, response_id: str) -> StoredResponse | None:
        found = await self._with_output(_RESPONSE, tenant, response_id)
        return found[0] if found else None

    async def _with_output(
        self, query: Select[Any], tenant: str, response_id: str
    ) -> tuple[StoredResponse, Sequence[Any]] | None:
        """Runs a `_response_with_output` query: the response with its output, and the first row."""
        async with self._reads.connect() as conn:
            rows = (
                await conn.execute(query, {"tenant": tenant, "response_id": response_id, "now": time.time()})
            ).all()
        if not rows:
            return None
        response = _to_response(rows[0])
        response.output = [row[-1] for row in rows if row[-1] is not None]
        return response, rows[0]

    @db_call
    async def history(self, tenant: str, response_id: str) -> list[tuple[bool, list[ItemPayload]]]:
        """Every segment of the lineage ending at `response_id`, oldest first: one query, whose cost
        follows the items it returns (a range of the items index per thread, and a walk of one index
        lookup per fork; none in a straight chain)."""
        rows: Sequence[Sequence[Any]]
        if self._postgres:
            rows = await fetch(self.engine, _HISTORY_ASYNCPG, response_id, tenant)
        else:
            async with self._reads.connect() as conn:
                params = {"response_id": response_id, "tenant": tenant}
                rows = (await conn.execute(_HISTORY_BY_JOIN, params)).all()
        segments: list[tuple[bool, list[ItemPayload]]] = []
        current: tuple[str, int] | None = None
        for response_ref, segment, payload in rows:
            if (response_ref, segment) != current:
                current = (response_ref, segment)
                segments.append((segment == OUTPUT_SEGMENT, []))
            segments[-1][1].append(payload)
        return segments

    async def write_turn(self, uow: UnitOfWork, turn: TurnWrite) -> None:
        """A finished turn that has no row yet: response, items and prefix record, in the caller's unit."""
        await self._insert(uow.conn, turn, None)

    @staticmethod
    async def _insert(conn: AsyncConnection, turn: TurnWrite, lease_expires_at: float | None) -> None:
        response = turn.response
        now = response.completed_at or response.created_at
        values = response_row(turn, lease_expires_at)
        item_rows = [
            item_row(response, INPUT_SEGMENT, position, item, now)
            for position, item in enumerate(turn.input_items)
        ] + [
            item_row(response, OUTPUT_SEGMENT, position, item, now)
            for position, item in enumerate(turn.output_items)
        ]
        await conn.execute(_INSERT_RESPONSE, values)
        if item_rows:
            await conn.execute(_INSERT_ITEMS, item_rows)
        if turn.prefix is not None:
            await conn.execute(_INSERT_PREFIX, prefix_row(response, turn.prefix))

    @db_call
    async def open_turn(self, turn: TurnWrite, lease_expires_at: float) -> None:
        """A queued or running response as accepted: the row with its input items and a lease, no output
        yet. Readable at once from any replica; `finish` moves it on."""
        async with self.engine.begin() as conn:
            await self._insert(conn, turn, lease_expires_at)

    @db_call
    async def start(self, tenant: str, response_id: str, lease_expires_at: float) -> bool:
        """queued -> in_progress, unless it was cancelled first."""
        async with self.engine.begin() as conn:
            result = await conn.execute(
                update(Response)
                .where(
                    Response.id == response_id,
                    Response.tenant == tenant,
                    Response.status == "queued",
                    Response.cancel_requested.is_(False),
                )
                .values(status="in_progress", lease_expires_at=lease_expires_at)
            )
        return bool(result.rowcount)

    @db_call
    async def renew_lease(self, response_id: str, lease_expires_at: float) -> bool:
        """Extend a running response's lease; False once it is no longer running (cancelled from any
        replica, or reaped after its lease ran out)."""
        async with self.engine.begin() as conn:
            result = await conn.execute(
                update(Response)
                .where(Response.id == response_id, Response.status == "in_progress")
                .values(lease_expires_at=lease_expires_at)
            )
        return bool(result.rowcount)

    async def finish(self, uow: UnitOfWork, turn: TurnWrite) -> bool:
        """Move a running response to its final status with its output and prefix record, in the caller's
        unit; False (and nothing written) if it is no longer running: cancelled or reaped meanwhile."""
        response = turn.response
        result = await uow.conn.execute(
            update(Response)
            .where(Response.id == response.id, Response.status == "in_progress")
            .values(
                status=response.status,
                usage=response.usage,
                error=response.error,
                incomplete_details=response.incomplete_details,
                completed_at=response.completed_at,
                lease_expires_at=None,
            )
        )
        if not result.rowcount:
            return False
        now = response.completed_at or response.created_at
        rows = [item_row(response, OUTPUT_SEGMENT, i, item, now) for i, item in enumerate(turn.output_items)]
        if rows:
            await uow.conn.execute(_INSERT_ITEMS, rows)
        if turn.prefix is not None:
            await uow.conn.execute(_INSERT_PREFIX, prefix_row(response, turn.prefix))
        return True

    @db_call
    async def cancel(self, tenant: str, response_id: str, now: float) -> StoredResponse | None:
        """Cancel a queued or running background response (idempotent); returns it as it now stands. The
        UPDATE rechecks the status, so a cancel that lost the race to completion changes nothing and the
        returned status says what really happened."""
        async with self.engine.begin() as conn:
            await conn.execute(
                update(Response)
                .where(
                    _live_response(tenant, response_id, now),
                    Response.background.is_(True),
                    Response.status.in_(("queued", "in_progress")),
                )
                .values(status="cancelled", cancel_requested=True, completed_at=now, lease_expires_at=None)
            )
        return await self.get(tenant, response_id)

    async def reap(self, uow: UnitOfWork, now: float, batch: int = 500) -> list[Reaped]:
        """Fail queued or running responses whose lease ran out (their process died), in bounded batches,
        in the caller's unit. Status and lease are rechecked by the UPDATE itself, so a response that
        committed its completion (or renewed its lease) meanwhile is left alone; returns what changed."""
        abandoned = and_(Response.status.in_(("queued", "in_progress")), Response.lease_expires_at < now)
        stale = select(Response.id).where(abandoned).limit(batch).scalar_subquery()
        error = {
            "code": "server_error",
            "message": "The process running this response stopped before it finished.",
        }
        result = await uow.conn.execute(
            update(Response)
            .where(Response.id.in_(stale), abandoned)
            .values(status="failed", error=error, completed_at=now, lease_expires_at=None)
            .returning(Response.id, Response.conversation_id)
        )
        return [Reaped(*row) for row in result.all()]

    @db_call
    async def invalidate_record(self, tenant: str, response_id: str, reason: str) -> bool:
        async with self.engine.begin() as conn:
            result = await conn.execute(
                update(PrefixRecord)
                .where(PrefixRecord.response_id == response_id, PrefixRecord.tenant == tenant)
                .values(status="invalidated", invalid_reason=reason)
            )
        return bool(result.rowcount)

    @db_call
    async def delete(self, tenant: str, response_id: str, now: float) -> bool:
        async with self.engine.begin() as conn:
            result = await conn.execute(
                update(Response)
                .where(_live_response(tenant, response_id, now), Response.store.is_(True))
                .values(deleted_at=now)
            )
        return bool(result.rowcount)

    @db_call
    async def input_items(
        self, tenant: str, response_id: str, *, after: str | None, limit: int, descending: bool
    ) -> tuple[bool, list[ItemPayload]] | None:
        """(has_more, page) of the items used to generate the response, as OpenAI lists them: in a
        conversation, its items before the turn; else its ancestors' inputs and outputs; then its own
        input. None if the response is unknown. One statement whatever the depth, reading a range of an
        index per part of the listing and per thread of the lineage (`_input_items`); a second one only
        for an empty page, to tell an unknown response from the end of the listing."""
        query = _INPUT_ITEMS[(self._postgres, descending, after is not None)]
        params = {"tenant": tenant, "response_id": response_id, "now": time.time(), "limit": limit + 1}
        if after is not None:
            params["after"] = after
        async with self._reads.connect() as conn:
            rows = (await conn.execute(query, params)).all()
            if not rows and not (await conn.execute(_EXISTS, params)).first():
                return None
        return len(rows) > limit, [row.payload for row in rows[:limit]]


def response_row(turn: TurnWrite, lease_expires_at: float | None) -> dict[str, Any]:
    """Every column of a new response's row."""
    response = turn.response
    row = {column.key: getattr(response, column.key) for column in RESPONSE_COLUMNS}
    row.update(
        expires_at=turn.expires_at,
        lease_expires_at=lease_expires_at,
        cancel_requested=False,
        deleted_at=None,
    )
    return row


def prefix_row(response: StoredResponse, prefix: PrefixWrite) -> dict[str, Any]:
    row = {key: getattr(prefix, key) for key in PrefixWrite.__slots__}
    # A record is as old as the decision it was built on (the turn's start), not its commit: an
    # invalidation made while the turn ran must cover the handle that turn continued.
    row.update(
        response_id=response.id, tenant=response.tenant, model=response.model, created_at=response.created_at
    )
    return row


def item_row(
    response: StoredResponse, segment: int, position: int, item: ItemPayload, now: float
) -> dict[str, Any]:
    return {
        "id": item["id"],
        "tenant": response.tenant,
        "response_id": response.id,
        "segment": segment,
        "position": position,
        "type": item["type"],
        "payload": item,
        "conversation_id": None,
        "conversation_position": None,
        "created_at": now,
        "thread": response.thread,
        "depth": response.depth,
    }
