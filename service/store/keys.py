"""API keys: create, list, revoke, and authenticate with a per-process cache.

A request with a known key costs no SQL: the key's hash maps to its principal in memory. The cache is
trusted only while the invalidation feed is fresh (a revocation reaches every replica through it within
its max lag); otherwise each request looks its key up again. Unknown keys are remembered too (bounded),
so a stream of wrong keys does not become a stream of queries; a new key is random, so it is never in
that list.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from service.domain.auth import Principal, Role, key_hash, new_key
from service.domain.invalidation import Scope
from service.errors import NotFound
from service.observe import db_call
from service.store.db import autocommit
from service.store.invalidations import Change, append
from service.store.models import ApiKey

UNKNOWN_KEYS_REMEMBERED = 10_000


@dataclass(slots=True)
class StoredKey:
    id: str
    tenant: str
    role: str
    name: str
    created_at: float
    revoked_at: float | None


_COLUMNS = (ApiKey.id, ApiKey.tenant, ApiKey.role, ApiKey.name, ApiKey.created_at, ApiKey.revoked_at)
_BY_HASH = select(ApiKey.id, ApiKey.tenant, ApiKey.role).where(ApiKey.revoked_at.is_(None))


def tenant_not_found(tenant: str) -> NotFound:
    return NotFound(f"No tenant found with id '{tenant}'.", param="tenant")


class KeyStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self._reads = autocommit(engine)
        self._known: dict[str, Principal] = {}
        self._unknown: OrderedDict[str, None] = OrderedDict()
        # Set by the app to the invalidation watcher's freshness; a store on its own (CLI) trusts nothing.
        self.cache_trusted: Callable[[], bool] = lambda: False

    async def authenticate(self, secret: str) -> Principal | None:
        digest = key_hash(secret)
        trusted = self.cache_trusted()
        if trusted:
            known = self._known.get(digest)
            if known is not None:
                return known
            if digest in self._unknown:
                return None
        found = await self._lookup(digest)
        if found is None:
            self._unknown[digest] = None
            if len(self._unknown) > UNKNOWN_KEYS_REMEMBERED:
                self._unknown.popitem(last=False)
        else:
            self._known[digest] = found
        return found

    @db_call
    async def _lookup(self, digest: str) -> Principal | None:
        async with self._reads.connect() as conn:
            row = (await conn.execute(_BY_HASH.where(ApiKey.key_hash == digest))).first()
        return None if row is None else Principal(row.tenant, Role(row.role), row.id)

    def forget(self, key_id: str) -> None:
        """Drop a revoked key from this process's cache."""
        for digest, principal in list(self._known.items()):
            if principal.key_id == key_id:
                del self._known[digest]

    @db_call
    async def create(self, tenant: str, role: Role, name: str, now: float) -> tuple[StoredKey, str]:
        """A new key for an existing tenant: (its record, the secret, shown once)."""
        key_id, secret = new_key()
        row = StoredKey(key_id, tenant, str(role), name, now, None)
        try:
            async with self.engine.begin() as conn:
                await conn.execute(
                    insert(ApiKey).values(
                        id=key_id,
                        key_hash=key_hash(secret),
                        tenant=tenant,
                        role=str(role),
                        name=name,
                        created_at=now,
                    )
                )
        except IntegrityError:
            raise tenant_not_found(tenant) from None
        return row, secret

    @db_call
    async def list(self, tenant: str | None = None) -> list[StoredKey]:
        query = select(*_COLUMNS).order_by(ApiKey.created_at)
        if tenant is not None:
            query = query.where(ApiKey.tenant == tenant)
        async with self._reads.connect() as conn:
            return [StoredKey(*row) for row in await conn.execute(query)]

    @db_call
    async def revoke(self, key_id: str, *, actor: str, reason: str, now: float) -> StoredKey | None:
        """Revoke a key (idempotent) and tell every replica through the feed; None if unknown."""
        statement = (
            update(ApiKey)
            .where(ApiKey.id == key_id)
            .values(revoked_at=func.coalesce(ApiKey.revoked_at, now))
            .returning(*_COLUMNS)
        )
        async with self.engine.begin() as conn:
            row = (await conn.execute(statement)).first()
            if row is None:
                return None
            await append(conn, Change(Scope.API_KEY, key_id, reason, actor, now))
        self.forget(key_id)
        return StoredKey(*row)


def provision_key(database_url: str, tenant: str, role: Role, name: str) -> str:
    """Blocking, for set-up code (demo, benchmarks, tests): the tenant (created if missing) and a new key
    for it; returns the secret."""
    from service.store.db import create_engine, dispose
    from service.store.tenants import TenantStore

    async def provision() -> str:
        engine = create_engine(database_url)
        try:
            now = time.time()
            await TenantStore(engine).create(tenant, None, now)
            return (await KeyStore(engine).create(tenant, role, name, now))[1]
        finally:
            await dispose(engine)

    return asyncio.run(provision())
