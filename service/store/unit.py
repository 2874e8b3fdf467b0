"""A unit of work: one transaction that several stores write in, so rows that belong together (a turn's
response, items and prefix record, and its conversation's append) commit together or not at all."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from service.observe import store_call


@dataclass(slots=True, frozen=True)
class UnitOfWork:
    """The open transaction; store methods that take one run their statements in it and never commit."""

    conn: AsyncConnection


@asynccontextmanager
async def unit_of_work(engine: AsyncEngine) -> AsyncIterator[UnitOfWork]:
    """Commits when the block ends, rolls back if it raises; all of it counts as database time, and an
    unreachable database raises ServiceUnavailable, as from any store method."""
    with store_call("a unit of work"):
        async with engine.begin() as conn:
            yield UnitOfWork(conn)
