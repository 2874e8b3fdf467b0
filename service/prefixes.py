"""Named prefixes: registered with a warm-up call to the backend, then applied to the requests that name
them (domain/prefixes.py holds the rules)."""

from __future__ import annotations

import time

from service.backends.client import BackendClient
from service.domain.prefixes import EXTENSION, Prefix, warm_up_body
from service.errors import InvalidRequest
from service.store.prefixes import PrefixStore, StoredPrefix
from service.store.tenants import TenantStore


class Prefixes:
    def __init__(self, backend: BackendClient, tenants: TenantStore, store: PrefixStore) -> None:
        self.backend = backend
        self.tenants = tenants
        self.store = store

    async def register(self, tenant: str, prefix: Prefix) -> StoredPrefix:
        """Warm the backend up with the prefix under the tenant's salt (its prefix cache then holds the
        prefix's KV), then keep the prefix by name. A backend that refuses it refuses the registration."""
        salt = await self.tenants.cache_salt(tenant)
        reply = await self.backend.chat(warm_up_body(prefix, salt))
        stored = StoredPrefix(prefix, reply.prompt_tokens, time.time())
        await self.store.put(tenant, stored)
        return stored

    async def named(self, tenant: str, name: str) -> Prefix:
        """The prefix a request names; a 400 naming the field if the tenant has none by that name."""
        stored = await self.store.get(tenant, name)
        if stored is None:
            raise InvalidRequest(f"No prefix named '{name}'.", param=EXTENSION, code="prefix_not_found")
        return stored.prefix
