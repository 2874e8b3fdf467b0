"""Tenants: their cache salts and retention. Each process caches a tenant after one read and drops it when
the invalidation feed says it changed (a salt rotation, a new retention), so a turn costs no SQL for it.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass

import xxhash
from sqlalchemy import insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from service.domain.invalidation import Scope
from service.observe import db_call
from service.store.db import autocommit
from service.store.invalidations import Change, append
from service.store.models import Tenant

DAY = 86400.0


@dataclass(slots=True)
class StoredTenant:
    id: str
    cache_salt: str
    created_at: float
    response_ttl_days: float | None
    replay_cache: bool = False

    @property
    def salt_id(self) -> str:
        """Names the salt (in fingerprints, in the admin API) without revealing it."""
        return xxhash.xxh3_64_hexdigest(self.cache_salt.encode())


_COLUMNS = (Tenant.id, Tenant.cache_salt, Tenant.created_at, Tenant.response_ttl_days, Tenant.replay_cache)


def _new_salt() -> str:
    return secrets.token_hex(32)


class TenantStore:
    def __init__(self, engine: AsyncEngine, default_ttl_days: float = 30.0) -> None:
        self.engine = engine
        self.default_ttl_days = default_ttl_days
        self._reads = autocommit(engine)
        self._cached: dict[str, StoredTenant] = {}
        self._stale: set[str] = set()

    async def cache_salt(self, tenant: str) -> str:
        return (await self.current(tenant)).cache_salt

    async def current(self, tenant: str) -> StoredTenant:
        """The tenant as last read (created on first use), read again after the feed says it changed."""
        cached = self._cached.get(tenant)
        if cached is None or tenant in self._stale:
            self._stale.discard(tenant)
            cached = self._cached[tenant] = await self._load_or_create(tenant)
        return cached

    def response_ttl_seconds(self, tenant: str) -> float:
        """How long a new response of the tenant lives, as last read (the turn read it for its salt)."""
        cached = self._cached.get(tenant)
        days = cached.response_ttl_days if cached is not None else None
        return (days if days is not None else self.default_ttl_days) * DAY

    def forget(self, tenant: str) -> None:
        """The tenant changed: read it again on its next turn."""
        self._stale.add(tenant)

    @db_call
    async def _load_or_create(self, tenant: str) -> StoredTenant:
        query = select(*_COLUMNS).where(Tenant.id == tenant)
        async with self._reads.connect() as conn:
            row = (await conn.execute(query)).first()
        if row is not None:
            return StoredTenant(*row)
        await self._insert(tenant, None, time.time())  # another replica may win the race; its salt wins
        async with self._reads.connect() as conn:
            return StoredTenant(*(await conn.execute(query)).one())

    @db_call
    async def create(self, tenant: str, response_ttl_days: float | None, now: float) -> StoredTenant | None:
        """A new tenant with a fresh salt; None if it exists."""
        return await self._insert(tenant, response_ttl_days, now)

    async def _insert(self, tenant: str, response_ttl_days: float | None, now: float) -> StoredTenant | None:
        created = StoredTenant(tenant, _new_salt(), now, response_ttl_days)
        try:
            async with self.engine.begin() as conn:
                await conn.execute(
                    insert(Tenant).values(
                        id=tenant,
                        cache_salt=created.cache_salt,
                        created_at=now,
                        response_ttl_days=response_ttl_days,
                    )
                )
        except IntegrityError:
            return None
        return created

    @db_call
    async def get(self, tenant: str) -> StoredTenant | None:
        async with self._reads.connect() as conn:
            row = (await conn.execute(select(*_COLUMNS).where(Tenant.id == tenant))).first()
        return None if row is None else StoredTenant(*row)

    @db_call
    async def list(self) -> list[StoredTenant]:
        async with self._reads.connect() as conn:
            return [StoredTenant(*row) for row in await conn.execute(select(*_COLUMNS).order_by(Tenant.id))]

    async def set_retention(
        self, tenant: str, response_ttl_days: float | None, *, actor: str, now: float
    ) -> StoredTenant | None:
        """New responses of the tenant live this long (None: the service default); None if unknown."""
        reason = f"response_ttl_days={response_ttl_days}"
        return await self._change(tenant, {"response_ttl_days": response_ttl_days}, reason, actor, now)

    async def set_replay_cache(
        self, tenant: str, enabled: bool, *, actor: str, now: float
    ) -> StoredTenant | None:
        """The tenant's requests use the replay cache by default (or no longer); None if unknown."""
        return await self._change(tenant, {"replay_cache": enabled}, f"replay_cache={enabled}", actor, now)

    async def rotate_salt(self, tenant: str, *, actor: str, reason: str, now: float) -> StoredTenant | None:
        """A new salt: the salt is a fingerprint part, so every handle of the tenant stops matching at
        once (`fingerprint_mismatch:cache_salt`), and the backend's cached KV under the old salt is never
        reused. None if the tenant is unknown."""
        return await self._change(tenant, {"cache_salt": _new_salt()}, reason, actor, now)

    @db_call
    async def _change(
        self, tenant: str, values: dict[str, object], reason: str, actor: str, now: float
    ) -> StoredTenant | None:
        """Update the tenant and tell every replica to read it again: one transaction, two rows."""
        statement = update(Tenant).where(Tenant.id == tenant).values(values).returning(*_COLUMNS)
        async with self.engine.begin() as conn:
            row = (await conn.execute(statement)).first()
            if row is None:
                return None
            await append(conn, Change(Scope.TENANT_CONFIG, tenant, reason, actor, now))
        self.forget(tenant)
        return StoredTenant(*row)
