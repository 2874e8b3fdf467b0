"""Token artifacts: the cold-path table of a turn's raw token ids.

Only the artifact writer (service/workers/artifacts.py), reseed on a backend miss, the admin API and
retention touch it; a turn that hits its parent's handle never does. The writer reads a batch's parents
in one query and stores the batch atomically: the artifacts of its responses that still exist, and the
parent records its observations contradicted. On Postgres both are single statements on the driver
(store/db.py `fetch`): the write is one statement of data-modifying CTEs, its rows one JSON document read
by `jsonb_populate_recordset` into the table's row type, as a turn's own write is (store/turns.py). On
SQLite the write is up to three statements in one transaction.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from sqlalchemy import (
    ColumnElement,
    Select,
    String,
    any_,
    bindparam,
    case,
    delete,
    func,
    insert,
    literal,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.dialects.postgresql.asyncpg import dialect as asyncpg_dialect
from sqlalchemy.ext.asyncio import AsyncEngine

from service.domain.artifacts import CONTRADICTED
from service.observe import db_call
from service.store.db import autocommit, fetch
from service.store.models import PrefixRecord, Response, TokenArtifact


@dataclass(frozen=True, slots=True)
class ParentRow:
    """A parent's record (fingerprint, safe-boundary claim) and its packed ids if its artifact exists."""

    fingerprint: str | None
    claimed_safe: bool
    safe_tokens: int | None
    prefix_hash: str | None
    prompt_ids: bytes | None
    output_ids: bytes | None
    prompt_start: int | None


@dataclass(frozen=True, slots=True)
class StoredArtifact:
    response_id: str
    tenant: str
    model: str
    template: str | None
    parent_id: str | None
    fingerprint: str | None
    decision: str
    prompt_count: int
    output_count: int
    prompt_start: int
    prompt_ids: bytes
    output_ids: bytes
    append_safe: bool | None
    divergence: int | None
    diagnostic: dict[str, Any] | None
    created_at: float
    expires_at: float


@dataclass(frozen=True, slots=True)
class Chain:
    """What it takes to rebuild a turn's whole prompt (`domain.artifacts.rebuild`): the packed prompt ids
    of its artifact and its ancestors' back to the last whole one, oldest first, as `(prompt_start, ids)`;
    and its own fingerprint and packed output."""

    fingerprint: str | None
    links: list[tuple[int, bytes]]
    output_ids: bytes


@dataclass(frozen=True, slots=True)
class AppendSafetyCount:
    model: str
    template: str | None
    observed: int
    safe: int
    contradicted: int


_ARTIFACT_COLUMNS = tuple(getattr(TokenArtifact, name) for name in StoredArtifact.__slots__)
_INSERT = insert(TokenArtifact)


_PARENT_COLUMNS: tuple[Any, ...] = (
    PrefixRecord.response_id,
    PrefixRecord.fingerprint,
    PrefixRecord.safe_boundary,
    PrefixRecord.safe_tokens,
    PrefixRecord.prefix_hash,
    TokenArtifact.prompt_ids,
    TokenArtifact.output_ids,
    TokenArtifact.prompt_start,
)


def _parents(match: ColumnElement[bool]) -> Select[Any]:
    """The prefix records `match` picks, with their artifacts' ids where written."""
    return (
        select(*_PARENT_COLUMNS)
        .outerjoin(TokenArtifact, TokenArtifact.response_id == PrefixRecord.response_id)
        .where(match)
    )


# `= ANY($1)`: one prepared statement whatever the batch's size. An IN list of each length would be
# another, and batches of varying size would push a turn's own statements out of each connection's
# statement cache, so that turns prepared them again. Its one parameter: the ids.
_PARENTS_ASYNCPG = str(
    _parents(PrefixRecord.response_id == any_(bindparam("ids", type_=ARRAY(String)))).compile(
        dialect=asyncpg_dialect()  # type: ignore[no-untyped-call]
    )
)
_PARENTS_BY_LIST = _parents(PrefixRecord.response_id.in_(bindparam("ids", expanding=True)))

# The batch's write, atomic as one statement: the artifacts of the responses that still exist (one
# deleted meanwhile is skipped), and the records of `$2` still valid invalidated; answers how many
# artifacts were written.
_WRITE_ASYNCPG = """
    WITH written AS (
        INSERT INTO token_artifacts
        SELECT a.* FROM jsonb_populate_recordset(NULL::token_artifacts, $1::jsonb) a
         WHERE EXISTS (SELECT 1 FROM responses r WHERE r.id = a.response_id)
        RETURNING 1),
    contradicted AS (
        UPDATE prefix_records SET status = 'invalidated', invalid_reason = $3
         WHERE response_id = ANY($2::varchar[]) AND status = 'valid')
    SELECT count(*) FROM written"""


def _bytea(value: object) -> str:
    """Packed ids in a JSON document: bytea's hex input form."""
    if isinstance(value, bytes):
        return "\\x" + value.hex()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


class ArtifactStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self._reads = autocommit(engine)
        self._postgres = engine.dialect.name == "postgresql"

    @db_call
    async def parents(self, response_ids: Collection[str]) -> dict[str, ParentRow]:
        """The prefix records of these responses, with their artifacts' ids where written: one query."""
        if not response_ids:
            return {}
        rows: Sequence[Sequence[Any]]
        if self._postgres:
            rows = await fetch(self.engine, _PARENTS_ASYNCPG, list(response_ids))
        else:
            async with self._reads.connect() as conn:
                rows = (await conn.execute(_PARENTS_BY_LIST, {"ids": list(response_ids)})).all()
        return {row[0]: ParentRow(row[1], bool(row[2]), *row[3:]) for row in rows}

    @db_call
    async def write(self, rows: Sequence[Mapping[str, Any]], contradicted: Collection[str]) -> int:
        """Insert the artifacts of responses that still exist (one deleted meanwhile is skipped) and
        invalidate the records in `contradicted`, atomically: one statement on Postgres, one
        transaction on SQLite. How many artifacts were written."""
        if self._postgres:
            document = orjson.dumps(rows, default=_bytea).decode()
            [(written,)] = await fetch(
                self.engine, _WRITE_ASYNCPG, document, list(contradicted), CONTRADICTED
            )
            return int(written)
        async with self.engine.begin() as conn:
            wanted = [row["response_id"] for row in rows]
            found = await conn.execute(select(Response.id).where(Response.id.in_(wanted)))
            existing = set(found.scalars())
            kept = [row for row in rows if row["response_id"] in existing]
            if kept:
                await conn.execute(_INSERT, kept)
            if contradicted:
                await conn.execute(
                    update(PrefixRecord)
                    .where(PrefixRecord.response_id.in_(list(contradicted)), PrefixRecord.status == "valid")
                    .values(status="invalidated", invalid_reason=CONTRADICTED)
                )
        return len(kept)

    @db_call
    async def get(self, response_id: str, tenant: str | None = None) -> StoredArtifact | None:
        """A turn's artifact; with `tenant`, only that tenant's."""
        query = select(*_ARTIFACT_COLUMNS).where(TokenArtifact.response_id == response_id)
        if tenant is not None:
            query = query.where(TokenArtifact.tenant == tenant)
        async with self._reads.connect() as conn:
            row = (await conn.execute(query)).first()
        return StoredArtifact(*row) if row else None

    @db_call
    async def chain(self, response_id: str, tenant: str | None = None) -> Chain | None:
        """A turn's artifact chain back to its last whole prompt (one recursive query, then the turn's own
        fingerprint and output), read only by reseed (after a
        handle failed: never on a hit), the admin view and the writer's comparison of a whole prompt with
        a parent that continued a handle. With `tenant`, only that tenant's."""
        artifact = TokenArtifact
        start = select(
            artifact.response_id,
            artifact.parent_id,
            artifact.prompt_start,
            artifact.prompt_ids,
            literal(0).label("hops"),
        ).where(artifact.response_id == response_id)
        if tenant is not None:
            start = start.where(artifact.tenant == tenant)
        links = start.cte("links", recursive=True)
        links = links.union_all(
            select(
                artifact.response_id,
                artifact.parent_id,
                artifact.prompt_start,
                artifact.prompt_ids,
                links.c.hops + 1,
            ).join(links, (artifact.response_id == links.c.parent_id) & (links.c.prompt_start > 0))
        )
        own = select(artifact.fingerprint, artifact.output_ids).where(artifact.response_id == response_id)
        async with self._reads.connect() as conn:
            rows = (
                await conn.execute(
                    select(links.c.prompt_start, links.c.prompt_ids).order_by(links.c.hops.desc())
                )
            ).all()
            head = (await conn.execute(own)).first() if rows else None
        if head is None:
            return None
        return Chain(head[0], [(int(row[0]), row[1]) for row in rows], head[1])

    @db_call
    async def append_safety(self, model: str | None = None) -> list[AppendSafetyCount]:
        """Observed append-safety by model and template: turns compared, safe, contradicting a claim."""
        observed = TokenArtifact.append_safe.is_not(None)
        query = (
            select(
                TokenArtifact.model,
                TokenArtifact.template,
                func.count(),
                func.coalesce(func.sum(case((TokenArtifact.append_safe.is_(True), 1), else_=0)), 0),
                func.coalesce(func.sum(case((TokenArtifact.diagnostic.is_not(None), 1), else_=0)), 0),
            )
            .where(observed)
            .group_by(TokenArtifact.model, TokenArtifact.template)
            .order_by(TokenArtifact.model, TokenArtifact.template)
        )
        if model is not None:
            query = query.where(TokenArtifact.model == model)
        async with self._reads.connect() as conn:
            rows = await conn.execute(query)
            return [AppendSafetyCount(row[0], row[1], *(int(value) for value in row[2:])) for row in rows]

    @db_call
    async def purge(self, now: float, batch: int) -> int:
        """Delete up to `batch` expired artifacts; how many went."""
        doomed = select(TokenArtifact.response_id).where(TokenArtifact.expires_at < now).limit(batch)
        async with self.engine.begin() as conn:
            result = await conn.execute(
                delete(TokenArtifact).where(TokenArtifact.response_id.in_(doomed.scalar_subquery()))
            )
        return int(result.rowcount or 0)
