"""The stream events of background responses created with `stream: true`: every SQL statement lives here.

The runner of such a turn appends its events in batches as it emits them, with their original sequence
numbers; any replica replays them after a sequence number and follows the table until the terminal event.
An event that carries the response holds it as the stored response's fields (the API renders it as it
renders a live event). Events expire with their response and the retention worker deletes them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, delete, insert, select, tuple_
from sqlalchemy.ext.asyncio import AsyncEngine

from service.observe import db_call
from service.store.db import autocommit
from service.store.models import ResponseEvent
from service.store.responses import StoredResponse

Event = dict[str, Any]


@dataclass(frozen=True, slots=True)
class LastEvent:
    sequence_number: int
    type: str


def _encode(event: Event) -> Event:
    response = event.get("response")
    if isinstance(response, StoredResponse):
        return {**event, "response": {name: getattr(response, name) for name in StoredResponse.__slots__}}
    return event


def _decode(event: Event) -> Event:
    response = event.get("response")
    if isinstance(response, dict):
        # An event recorded before responses had threads carries none (a thread is never rendered).
        return {**event, "response": StoredResponse(**{"thread": response["id"], **response})}
    return event


def _of(tenant: str, response_id: str) -> Any:
    return and_(ResponseEvent.response_id == response_id, ResponseEvent.tenant == tenant)


class EventStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self._reads = autocommit(engine)

    @db_call
    async def append(
        self, tenant: str, response_id: str, expires_at: float, events: Sequence[Event], now: float
    ) -> None:
        """Add emitted events (each with its sequence number): one multi-row INSERT."""
        rows = [
            {
                "response_id": response_id,
                "sequence_number": event["sequence_number"],
                "tenant": tenant,
                "type": event["type"],
                "event": _encode(event),
                "created_at": now,
                "expires_at": expires_at,
            }
            for event in events
        ]
        async with self.engine.begin() as conn:
            await conn.execute(insert(ResponseEvent), rows)

    @db_call
    async def after(self, tenant: str, response_id: str, sequence_number: int, limit: int) -> list[Event]:
        """Up to `limit` events after `sequence_number`, in order: one query."""
        query = (
            select(ResponseEvent.event)
            .where(_of(tenant, response_id), ResponseEvent.sequence_number > sequence_number)
            .order_by(ResponseEvent.sequence_number)
            .limit(limit)
        )
        async with self._reads.connect() as conn:
            return [_decode(row.event) for row in await conn.execute(query)]

    @db_call
    async def last(self, tenant: str, response_id: str) -> LastEvent | None:
        """The last event recorded for the response (None if it never was streamed): one query."""
        query = (
            select(ResponseEvent.sequence_number, ResponseEvent.type)
            .where(_of(tenant, response_id))
            .order_by(ResponseEvent.sequence_number.desc())
            .limit(1)
        )
        async with self._reads.connect() as conn:
            row = (await conn.execute(query)).first()
        return None if row is None else LastEvent(*row)

    @db_call
    async def purge(self, now: float, batch: int) -> int:
        """Delete up to `batch` expired events; how many went."""
        key = tuple_(ResponseEvent.response_id, ResponseEvent.sequence_number)
        doomed = (
            select(ResponseEvent.response_id, ResponseEvent.sequence_number)
            .where(ResponseEvent.expires_at < now)
            .limit(batch)
        )
        async with self.engine.begin() as conn:
            result = await conn.execute(delete(ResponseEvent).where(key.in_(doomed)))
        return int(result.rowcount or 0)
