"""Tenants and their cache salts. A salt never changes, so each process caches it after one read."""

from __future__ import annotations

import secrets
import time

from sqlalchemy import insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from service.observe import db_call
from service.store.db import autocommit
from service.store.models import Tenant


class TenantStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self._reads = autocommit(engine)
        self._salts: dict[str, str] = {}

    async def cache_salt(self, tenant: str) -> str:
        salt = self._salts.get(tenant)
        if salt is None:
            salt = await self._load_or_create(tenant)
            self._salts[tenant] = salt
        return salt

    @db_call
    async def _load_or_create(self, tenant: str) -> str:
        query = select(Tenant.cache_salt).where(Tenant.id == tenant)
        async with self._reads.connect() as conn:
            salt = (await conn.execute(query)).scalar_one_or_none()
        if salt is not None:
            return salt
        try:
            async with self.engine.begin() as conn:
                await conn.execute(
                    insert(Tenant).values(id=tenant, cache_salt=secrets.token_hex(32), created_at=time.time())
                )
        except IntegrityError:
            pass  # another replica created it first; its salt wins
        async with self._reads.connect() as conn:
            return str((await conn.execute(query)).scalar_one())
