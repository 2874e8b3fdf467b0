"""Tenant isolation seen in vLLM's KV cache: each tenant's cache_salt keeps its prefix-cache blocks its
own, so a long prefix repeated within a tenant is served from the cache and never across tenants.

The service has no API-key-to-tenant seam yet (every caller is the default tenant), so this drives the
service's backend client with the salts TenantStore gives two tenants, one layer below the HTTP API."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from service.backends.client import BackendClient
from service.config import Settings
from service.store.tenants import TenantStore
from tests.vllm.conftest import Vllm

pytestmark = pytest.mark.vllm


async def test_kv_cache_reuse_stays_within_a_tenant(vllm: Vllm, pg_engine: AsyncEngine) -> None:
    tenants = TenantStore(pg_engine)
    salt_a = await tenants.cache_salt(f"tenant-a-{uuid.uuid4().hex}")
    salt_b = await tenants.cache_salt(f"tenant-b-{uuid.uuid4().hex}")
    assert salt_a != salt_b
    client = BackendClient(Settings(backend_url=vllm.url, backend_api_key=vllm.api_key))
    preamble = f"Shared preamble {uuid.uuid4().hex}: a long manual on tending orchard trees. " * 30

    async def cached_tokens(salt: str, question: str) -> int:
        body = {
            "model": vllm.model,
            "messages": [{"role": "system", "content": preamble}, {"role": "user", "content": question}],
            "cache_salt": salt,
            "max_tokens": 4,
        }
        return (await client.chat(body)).cached_tokens

    try:
        assert await cached_tokens(salt_a, "When to prune?") == 0
        assert await cached_tokens(salt_a, "When to water?") > 0
        assert await cached_tokens(salt_b, "When to prune?") == 0
        assert await cached_tokens(salt_b, "When to water?") > 0
    finally:
        await client.aclose()
