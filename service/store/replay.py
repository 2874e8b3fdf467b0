"""The replay cache's rows: lookups, the single-flight claim, fills, and the management queries.

Single flight works across processes and replicas through the row itself. The first request for a key
inserts it `pending`, with an owner and a lease it renews while it asks the backend; every other
request for the key finds it pending and polls until it is `ready` (then it is a hit), gone (the owner
failed: it claims the key itself) or its lease has run out (the owner died: it takes the claim over).
A claim is one INSERT ... ON CONFLICT DO UPDATE ... WHERE (stale) RETURNING, on Postgres and SQLite
alike, so exactly one claimant wins however many race.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import BigInteger, and_, delete, func, literal, or_, select, tuple_, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.sql.elements import ColumnElement

from service.observe import db_call
from service.store.db import autocommit
from service.store.models import ReplayEntry

PENDING = "pending"
READY = "ready"


@dataclass(slots=True)
class Entry:
    """One cache row as the management API shows it (the result only when asked for)."""

    tenant: str
    key: str
    endpoint: str
    model: str
    fingerprint: str | None
    status: str
    bytes: int
    created_at: float
    expires_at: float
    request: dict[str, Any] | None = None
    result: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class Found:
    """What a lookup saw: a ready result, or a pending claim and when its lease runs out."""

    status: str
    result: dict[str, Any] | None
    lease_expires_at: float | None
    expires_at: float


@dataclass(frozen=True, slots=True)
class Claim:
    tenant: str
    key: str
    endpoint: str
    model: str
    fingerprint: str | None
    request: dict[str, Any]
    owner: str


@dataclass(frozen=True, slots=True)
class Selection:
    """Which entries a management call covers; every field narrows it."""

    tenant: str | None = None
    model: str | None = None
    key_prefix: str | None = None
    created_before: float | None = None

    def where(self) -> list[ColumnElement[bool]]:
        conditions: list[ColumnElement[bool]] = [ReplayEntry.status == READY]
        if self.tenant is not None:
            conditions.append(ReplayEntry.tenant == self.tenant)
        if self.model is not None:
            conditions.append(ReplayEntry.model == self.model)
        if self.key_prefix:
            conditions.append(ReplayEntry.key.startswith(self.key_prefix, autoescape=True))
        if self.created_before is not None:
            conditions.append(ReplayEntry.created_at < self.created_before)
        return conditions


@dataclass(frozen=True, slots=True)
class ModelStats:
    tenant: str
    model: str
    entries: int
    bytes: int
    oldest: float
    newest: float


_LISTED = (
    ReplayEntry.tenant,
    ReplayEntry.key,
    ReplayEntry.endpoint,
    ReplayEntry.model,
    ReplayEntry.fingerprint,
    ReplayEntry.status,
    ReplayEntry.bytes,
    ReplayEntry.created_at,
    ReplayEntry.expires_at,
)


def _upsert(conn: AsyncConnection) -> Any:
    return postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert


class ReplayStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self._reads = autocommit(engine)

    # --- the request path ---------------------------------------------------------------------------

    @db_call
    async def find(self, tenant: str, key: str) -> Found | None:
        """One statement: the hit path costs nothing more."""
        query = select(
            ReplayEntry.status, ReplayEntry.result, ReplayEntry.lease_expires_at, ReplayEntry.expires_at
        ).where(ReplayEntry.tenant == tenant, ReplayEntry.key == key)
        async with self._reads.connect() as conn:
            row = (await conn.execute(query)).first()
        return None if row is None else Found(*row)

    @db_call
    async def claim(self, claim: Claim, now: float, lease_seconds: float, *, refresh: bool = False) -> bool:
        """Take the key for one backend call: True if this caller now owns it. A missing row is inserted;
        an existing one is taken only when stale (expired, or pending under a lease that ran out) or,
        with `refresh`, when it is ready; never from a live owner."""
        values = {
            "tenant": claim.tenant,
            "key": claim.key,
            "endpoint": claim.endpoint,
            "model": claim.model,
            "fingerprint": claim.fingerprint,
            "status": PENDING,
            "owner": claim.owner,
            "lease_expires_at": now + lease_seconds,
            "request": claim.request,
            "result": None,
            "bytes": 0,
            "created_at": now,
            "expires_at": now + lease_seconds,
        }
        lapsed = and_(ReplayEntry.status == PENDING, ReplayEntry.lease_expires_at < now)
        replaceable = ReplayEntry.status == READY
        if not refresh:
            replaceable = and_(replaceable, ReplayEntry.expires_at <= now)
        stale = or_(lapsed, replaceable)
        async with self.engine.begin() as conn:
            statement = _upsert(conn)(ReplayEntry).values(values)
            statement = statement.on_conflict_do_update(
                index_elements=[ReplayEntry.tenant, ReplayEntry.key],
                set_={name: statement.excluded[name] for name in values if name not in ("tenant", "key")},
                where=stale,
            ).returning(ReplayEntry.owner)
            return (await conn.execute(statement)).first() is not None

    def _owned(self, tenant: str, key: str, owner: str) -> ColumnElement[bool]:
        return and_(
            ReplayEntry.tenant == tenant,
            ReplayEntry.key == key,
            ReplayEntry.owner == owner,
            ReplayEntry.status == PENDING,
        )

    @db_call
    async def renew(self, tenant: str, key: str, owner: str, until: float) -> bool:
        statement = update(ReplayEntry).where(self._owned(tenant, key, owner)).values(lease_expires_at=until)
        async with self.engine.begin() as conn:
            return (await conn.execute(statement)).rowcount == 1

    @db_call
    async def fill(
        self, tenant: str, key: str, owner: str, result: dict[str, Any], size: int, now: float, ttl: float
    ) -> bool:
        """Store the owner's result: the entry is ready for everyone. False if the claim was lost."""
        statement = (
            update(ReplayEntry)
            .where(self._owned(tenant, key, owner))
            .values(
                status=READY,
                owner=None,
                lease_expires_at=None,
                result=result,
                bytes=size,
                created_at=now,
                expires_at=now + ttl,
            )
        )
        async with self.engine.begin() as conn:
            return (await conn.execute(statement)).rowcount == 1

    @db_call
    async def abandon(self, tenant: str, key: str, owner: str) -> None:
        """The owner's call failed: nothing is cached, and a waiter claims the key next."""
        async with self.engine.begin() as conn:
            await conn.execute(delete(ReplayEntry).where(self._owned(tenant, key, owner)))

    @db_call
    async def drop_other_fingerprints(self, model: str, fingerprint: str | None) -> int:
        """The backend now serves `model` under `fingerprint`: entries made under any other go."""
        other = (
            ReplayEntry.fingerprint.is_not(None)
            if fingerprint is None
            else or_(ReplayEntry.fingerprint.is_(None), ReplayEntry.fingerprint != fingerprint)
        )
        statement = delete(ReplayEntry).where(ReplayEntry.model == model, ReplayEntry.status == READY, other)
        async with self.engine.begin() as conn:
            return int((await conn.execute(statement)).rowcount)

    # --- bounds -------------------------------------------------------------------------------------

    @db_call
    async def purge(self, now: float, max_entries: int, max_bytes: int) -> tuple[int, int]:
        """Delete expired entries, then the oldest beyond `max_entries` or beyond `max_bytes` in all:
        (expired, evicted)."""
        async with self.engine.begin() as conn:
            expired = await conn.execute(
                delete(ReplayEntry).where(
                    ReplayEntry.expires_at <= now,
                    or_(ReplayEntry.status == READY, ReplayEntry.lease_expires_at < now),
                )
            )
            # Newest first: an entry's rank and the bytes of it and every newer one.
            newer = (
                select(
                    ReplayEntry.tenant,
                    ReplayEntry.key,
                    func.row_number()
                    .over(order_by=(ReplayEntry.created_at.desc(), ReplayEntry.key.desc()))
                    .label("rank"),
                    func.sum(ReplayEntry.bytes)
                    .over(order_by=(ReplayEntry.created_at.desc(), ReplayEntry.key.desc()))
                    .label("total"),
                )
                .where(ReplayEntry.status == READY)
                .subquery()
            )
            beyond = select(newer.c.tenant, newer.c.key).where(
                or_(newer.c.rank > max_entries, newer.c.total > literal(max_bytes, BigInteger()))
            )
            evicted = await conn.execute(
                delete(ReplayEntry).where(tuple_(ReplayEntry.tenant, ReplayEntry.key).in_(beyond))
            )
        return int(expired.rowcount), int(evicted.rowcount)

    # --- management ---------------------------------------------------------------------------------

    @db_call
    async def stats(self, selection: Selection) -> list[ModelStats]:
        query = (
            select(
                ReplayEntry.tenant,
                ReplayEntry.model,
                func.count(),
                func.coalesce(func.sum(ReplayEntry.bytes), 0),
                func.min(ReplayEntry.created_at),
                func.max(ReplayEntry.created_at),
            )
            .where(*selection.where())
            .group_by(ReplayEntry.tenant, ReplayEntry.model)
            .order_by(ReplayEntry.tenant, ReplayEntry.model)
        )
        async with self._reads.connect() as conn:
            return [ModelStats(*row) for row in await conn.execute(query)]

    @db_call
    async def list(
        self, selection: Selection, limit: int, *, after: tuple[float, str] | None = None, whole: bool = False
    ) -> list[Entry]:
        """A page of the selected entries, oldest first, after the (created_at, key) of the previous page's
        last; with `whole`, each with its request and result (an export)."""
        columns = (*_LISTED, ReplayEntry.request, ReplayEntry.result) if whole else _LISTED
        query = (
            select(*columns)
            .where(*selection.where())
            .order_by(ReplayEntry.created_at, ReplayEntry.key)
            .limit(limit)
        )
        if after is not None:
            query = query.where(
                or_(
                    ReplayEntry.created_at > after[0],
                    and_(ReplayEntry.created_at == after[0], ReplayEntry.key > after[1]),
                )
            )
        async with self._reads.connect() as conn:
            return [Entry(*row) for row in await conn.execute(query)]

    @db_call
    async def delete(self, selection: Selection) -> int:
        async with self.engine.begin() as conn:
            return int((await conn.execute(delete(ReplayEntry).where(*selection.where()))).rowcount)

    @db_call
    async def load(self, entries: Iterable[Entry]) -> int:
        """Import entries as ready (one statement); an existing key keeps the newer of the two."""
        rows = [
            {
                "tenant": entry.tenant,
                "key": entry.key,
                "endpoint": entry.endpoint,
                "model": entry.model,
                "fingerprint": entry.fingerprint,
                "status": READY,
                "owner": None,
                "lease_expires_at": None,
                "request": entry.request,
                "result": entry.result,
                "bytes": entry.bytes,
                "created_at": entry.created_at,
                "expires_at": entry.expires_at,
            }
            for entry in entries
        ]
        if not rows:
            return 0
        async with self.engine.begin() as conn:
            statement = _upsert(conn)(ReplayEntry).values(rows)
            statement = statement.on_conflict_do_update(
                index_elements=[ReplayEntry.tenant, ReplayEntry.key],
                set_={name: statement.excluded[name] for name in rows[0] if name not in ("tenant", "key")},
                where=ReplayEntry.created_at < statement.excluded.created_at,
            )
            await conn.execute(statement)
        return len(rows)
