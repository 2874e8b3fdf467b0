"""Named prefixes of each tenant: registered (a new registration of a name replaces it), read, listed,
deleted."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncEngine

from service.domain.prefixes import Prefix
from service.observe import db_call
from service.store.db import autocommit
from service.store.models import NamedPrefix


@dataclass(frozen=True, slots=True)
class StoredPrefix:
    prefix: Prefix
    prompt_tokens: int | None
    created_at: float


_COLUMNS = (
    NamedPrefix.name,
    NamedPrefix.model,
    NamedPrefix.instructions,
    NamedPrefix.tools,
    NamedPrefix.input,
    NamedPrefix.prompt_tokens,
    NamedPrefix.created_at,
)


def _stored(row: Any) -> StoredPrefix:
    prefix = Prefix(row.name, row.model, row.instructions, row.tools, row.input)
    return StoredPrefix(prefix, row.prompt_tokens, row.created_at)


class PrefixStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self._reads = autocommit(engine)

    @db_call
    async def put(self, tenant: str, stored: StoredPrefix) -> None:
        prefix = stored.prefix
        values = {
            "tenant": tenant,
            "name": prefix.name,
            "model": prefix.model,
            "instructions": prefix.instructions,
            "tools": prefix.tools,
            "input": prefix.input,
            "prompt_tokens": stored.prompt_tokens,
            "created_at": stored.created_at,
        }
        async with self.engine.begin() as conn:
            insert = (postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert)(NamedPrefix)
            statement = insert.values(values)
            statement = statement.on_conflict_do_update(
                index_elements=[NamedPrefix.tenant, NamedPrefix.name],
                set_={name: statement.excluded[name] for name in values if name not in ("tenant", "name")},
            )
            await conn.execute(statement)

    @db_call
    async def get(self, tenant: str, name: str) -> StoredPrefix | None:
        query = select(*_COLUMNS).where(NamedPrefix.tenant == tenant, NamedPrefix.name == name)
        async with self._reads.connect() as conn:
            row = (await conn.execute(query)).first()
        return None if row is None else _stored(row)

    @db_call
    async def list(self, tenant: str) -> list[StoredPrefix]:
        query = select(*_COLUMNS).where(NamedPrefix.tenant == tenant).order_by(NamedPrefix.name)
        async with self._reads.connect() as conn:
            return [_stored(row) for row in await conn.execute(query)]

    @db_call
    async def delete(self, tenant: str, name: str) -> bool:
        statement = delete(NamedPrefix).where(NamedPrefix.tenant == tenant, NamedPrefix.name == name)
        async with self.engine.begin() as conn:
            return (await conn.execute(statement)).rowcount == 1
