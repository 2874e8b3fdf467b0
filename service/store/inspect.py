"""What the admin API reads: a lineage or a conversation turn by turn with its prefix records, and
decision statistics. Operators see every tenant; nothing here is on a turn's path."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import Select, func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from service.domain.stats import DecisionCount
from service.observe import db_call
from service.store.db import autocommit
from service.store.models import PrefixRecord, Response, TokenArtifact


@dataclass(slots=True)
class InspectedTurn:
    id: str
    tenant: str
    model: str
    status: str
    conversation_id: str | None
    lineage_root: str | None
    depth: int
    created_at: float
    expires_at: float
    deleted_at: float | None
    # The prefix record; None when the turn has none (store=false never gets here; failed turns do).
    record_status: str | None
    invalid_reason: str | None
    decision_path: str | None
    decision_reason: str | None
    prompt_tokens: int | None
    cached_tokens: int | None
    bytes_sent: int | None
    turn_tokens: int | None
    safe_boundary: bool | None
    safe_tokens: int | None
    prefix_hash: str | None
    covers_output: bool | None
    fingerprint: str | None
    fingerprint_parts: dict[str, Any] | None
    handle_ref: str | None
    handle_endpoint: str | None
    handle_epoch: str | None
    handle_expires_at: float | None
    record_created_at: float | None
    # Observed append-safety against the parent's ids (None: no artifact yet, or not comparable).
    append_safe: bool | None
    divergence: int | None


_TURN_COLUMNS = (
    Response.id,
    Response.tenant,
    Response.model,
    Response.status,
    Response.conversation_id,
    Response.lineage_root,
    Response.depth,
    Response.created_at,
    Response.expires_at,
    Response.deleted_at,
    PrefixRecord.status,
    PrefixRecord.invalid_reason,
    PrefixRecord.decision_path,
    PrefixRecord.decision_reason,
    PrefixRecord.prompt_tokens,
    PrefixRecord.cached_tokens,
    PrefixRecord.bytes_sent,
    PrefixRecord.turn_tokens,
    PrefixRecord.safe_boundary,
    PrefixRecord.safe_tokens,
    PrefixRecord.prefix_hash,
    PrefixRecord.covers_output,
    PrefixRecord.fingerprint,
    PrefixRecord.fingerprint_parts,
    PrefixRecord.handle_ref,
    PrefixRecord.handle_endpoint,
    PrefixRecord.handle_epoch,
    PrefixRecord.handle_expires_at,
    PrefixRecord.created_at,
    TokenArtifact.append_safe,
    TokenArtifact.divergence,
)


def _turns() -> Select[Any]:
    return (
        select(*_TURN_COLUMNS)
        .outerjoin(PrefixRecord, PrefixRecord.response_id == Response.id)
        .outerjoin(TokenArtifact, TokenArtifact.response_id == Response.id)
    )


class InspectStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self._reads = autocommit(engine)

    async def _all(self, query: Select[Any]) -> list[InspectedTurn]:
        async with self._reads.connect() as conn:
            return [InspectedTurn(*row) for row in await conn.execute(query)]

    @db_call
    async def lineage(self, response_id: str) -> list[InspectedTurn]:
        """The response and its ancestors through previous_response_id, oldest first: one query."""
        lineage = (
            select(Response.id, Response.previous_response_id)
            .where(Response.id == response_id)
            .cte("lineage", recursive=True)
        )
        lineage = lineage.union_all(
            select(Response.id, Response.previous_response_id).join(
                lineage, Response.id == lineage.c.previous_response_id
            )
        )
        query = _turns().join(lineage, lineage.c.id == Response.id).order_by(Response.depth)
        return await self._all(query)

    @db_call
    async def conversation(self, conversation_id: str) -> list[InspectedTurn]:
        """Every turn of a conversation, oldest first."""
        query = (
            _turns()
            .where(Response.conversation_id == conversation_id)
            .order_by(Response.depth, Response.created_at)
        )
        return await self._all(query)

    @db_call
    async def decisions(
        self, tenant: str | None, model: str | None, since: float | None
    ) -> list[DecisionCount]:
        """Stored turns by tenant, model, path and reason, with their tokens and bytes."""
        query = select(
            PrefixRecord.tenant,
            PrefixRecord.model,
            PrefixRecord.decision_path,
            PrefixRecord.decision_reason,
            func.count(),
            func.coalesce(func.sum(PrefixRecord.prompt_tokens), 0),
            func.coalesce(func.sum(PrefixRecord.cached_tokens), 0),
            func.coalesce(func.sum(PrefixRecord.bytes_sent), 0),
        ).group_by(
            PrefixRecord.tenant, PrefixRecord.model, PrefixRecord.decision_path, PrefixRecord.decision_reason
        )
        if tenant is not None:
            query = query.where(PrefixRecord.tenant == tenant)
        if model is not None:
            query = query.where(PrefixRecord.model == model)
        if since is not None:
            query = query.where(PrefixRecord.created_at >= since)
        async with self._reads.connect() as conn:
            rows = await conn.execute(query.order_by(PrefixRecord.tenant, PrefixRecord.model))
            return [DecisionCount(*row[:4], *(int(value or 0) for value in row[4:])) for row in rows]
