"""The invalidations table: scoped invalidations, the change feed every replica follows, and its audit log.

Writing one is one row (plus a NOTIFY on Postgres, in the same transaction) whatever it covers. Reading
the feed is one query for the rows after the last id a replica has seen.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import bindparam, insert, select, text
from sqlalchemy.dialects.postgresql.asyncpg import dialect as asyncpg_dialect
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from service.domain.invalidation import Rule, Scope
from service.observe import db_call
from service.store.db import autocommit
from service.store.models import Invalidation, Response

CHANNEL = "convstate_invalidations"


@dataclass(slots=True)
class StoredInvalidation:
    id: int
    scope: str
    key: str | None
    lineage_root: str | None
    depth: int | None
    reason: str
    actor: str
    created_at: float

    @property
    def rule(self) -> Rule:
        return Rule(self.id, Scope(self.scope), self.key, self.lineage_root, self.depth, self.created_at)


_COLUMNS = (
    Invalidation.id,
    Invalidation.scope,
    Invalidation.key,
    Invalidation.lineage_root,
    Invalidation.depth,
    Invalidation.reason,
    Invalidation.actor,
    Invalidation.created_at,
)


@dataclass(frozen=True, slots=True)
class Change:
    """What to append to the feed."""

    scope: Scope
    key: str | None
    reason: str
    actor: str
    now: float
    # Response scope: the response's lineage root and depth.
    lineage_root: str | None = None
    depth: int | None = None


async def append(conn: AsyncConnection, change: Change) -> StoredInvalidation:
    """Inside the caller's transaction: one row, and a wake-up for every listening replica on commit."""
    values: dict[str, Any] = {
        "scope": str(change.scope),
        "key": change.key,
        "lineage_root": change.lineage_root,
        "depth": change.depth,
        "reason": change.reason,
        "actor": change.actor,
        "created_at": change.now,
    }
    row: Sequence[Any] = (await conn.execute(insert(Invalidation).values(values).returning(*_COLUMNS))).one()
    if conn.dialect.name == "postgresql":
        await conn.execute(text("SELECT pg_notify(:channel, '')"), {"channel": CHANNEL})
    return StoredInvalidation(*row)


class InvalidationStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self._reads = autocommit(engine)

    @db_call
    async def add(self, change: Change) -> StoredInvalidation:
        async with self.engine.begin() as conn:
            return await append(conn, change)

    @db_call
    async def lineage_position(self, response_id: str) -> tuple[str, int] | None:
        """(lineage root, depth) of a stored response: what a response-scope rule is keyed by."""
        query = select(Response.lineage_root, Response.depth).where(Response.id == response_id)
        async with self._reads.connect() as conn:
            row = (await conn.execute(query)).first()
        if row is None:
            return None
        return (row.lineage_root or response_id), row.depth

    @db_call
    async def recent(self, limit: int, before: int | None = None) -> list[StoredInvalidation]:
        """The audit log, newest first."""
        query = select(*_COLUMNS).order_by(Invalidation.id.desc()).limit(limit)
        if before is not None:
            query = query.where(Invalidation.id < before)
        async with self._reads.connect() as conn:
            return [StoredInvalidation(*row) for row in await conn.execute(query)]


# Polled several times a second by every replica: built once (building a query is most of its cost),
# and on Postgres run on the driver itself (SQLAlchemy's execution was most of what remained).
_AFTER = select(*_COLUMNS).where(Invalidation.id > bindparam("last_id")).order_by(Invalidation.id)
_AFTER_ASYNCPG = str(_AFTER.compile(dialect=asyncpg_dialect()))  # type: ignore[no-untyped-call]


async def read_after(conn: AsyncConnection, last_id: int) -> list[StoredInvalidation]:
    """The feed after `last_id`, oldest first, on the watcher's own connection."""
    if conn.dialect.name != "postgresql":
        return [StoredInvalidation(*row) for row in await conn.execute(_AFTER, {"last_id": last_id})]
    driver = (await conn.get_raw_connection()).driver_connection
    assert driver is not None
    try:
        return [StoredInvalidation(*row) for row in await driver.fetch(_AFTER_ASYNCPG, last_id)]
    except BaseException:
        if driver.is_closed():
            await conn.invalidate()  # the watcher's next connection must be a new one
        raise


async def listen(conn: AsyncConnection, wake: Callable[[], None]) -> bool:
    """Subscribe the watcher's connection to the feed's notifications; False where there are none
    (SQLite), so the watcher relies on its poll alone."""
    if conn.dialect.name != "postgresql":
        return False
    driver = (await conn.get_raw_connection()).driver_connection
    assert driver is not None
    await driver.add_listener(CHANNEL, lambda *_args: wake())
    return True
