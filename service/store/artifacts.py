"""Token artifacts: the cold-path table of a turn's raw token ids.

Only the artifact writer (service/workers/artifacts.py), reseed on a backend miss, the admin API and
retention touch it; a turn that hits its parent's handle never does. The writer stores a batch in one
transaction: which of its responses still exist, then one multi-row insert, then the parent records its
observations contradicted.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import case, delete, func, insert, literal, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from service.domain.artifacts import CONTRADICTED
from service.observe import db_call
from service.store.db import autocommit, one_of
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


class ArtifactStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self._reads = autocommit(engine)

    @db_call
    async def parents(self, response_ids: Collection[str]) -> dict[str, ParentRow]:
        """The prefix records of these responses, with their artifacts' ids where written: one query."""
        if not response_ids:
            return {}
        query = (
            select(
                PrefixRecord.response_id,
                PrefixRecord.fingerprint,
                PrefixRecord.safe_boundary,
                PrefixRecord.safe_tokens,
                PrefixRecord.prefix_hash,
                TokenArtifact.prompt_ids,
                TokenArtifact.output_ids,
                TokenArtifact.prompt_start,
            )
            .outerjoin(TokenArtifact, TokenArtifact.response_id == PrefixRecord.response_id)
            .where(one_of(self.engine, PrefixRecord.response_id, list(response_ids)))
        )
        async with self._reads.connect() as conn:
            rows = await conn.execute(query)
            return {row[0]: ParentRow(row[1], bool(row[2]), *row[3:]) for row in rows}

    @db_call
    async def write(self, rows: Sequence[Mapping[str, Any]], contradicted: Collection[str]) -> int:
        """Insert the artifacts of responses that still exist (one deleted meanwhile is skipped) and
        invalidate the records in `contradicted`, in one transaction; how many artifacts were written."""
        async with self.engine.begin() as conn:
            wanted = [row["response_id"] for row in rows]
            found = await conn.execute(select(Response.id).where(one_of(self.engine, Response.id, wanted)))
            existing = set(found.scalars())
            kept = [row for row in rows if row["response_id"] in existing]
            if kept:
                await conn.execute(_INSERT, kept)
            if contradicted:
                await conn.execute(
                    update(PrefixRecord)
                    .where(
                        one_of(self.engine, PrefixRecord.response_id, list(contradicted)),
                        PrefixRecord.status == "valid",
                    )
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
