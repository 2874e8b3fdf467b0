"""Tenant isolation seen in vLLM's KV cache, end to end: two tenants' API keys on one service, each
tenant's cache_salt keeping its prefix-cache blocks its own, so a long prefix repeated within a tenant is
served from the cache and never across tenants."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from tests.conftest import Service, new_tenant
from tests.vllm.conftest import Vllm

pytestmark = pytest.mark.vllm


def test_kv_cache_reuse_stays_within_a_tenant(
    vllm: Vllm, vllm_service: Any, migrated_urls: dict[str, str]
) -> None:
    service: Service = vllm_service("full")
    tenant_a = new_tenant(migrated_urls["postgres"])
    tenant_b = new_tenant(migrated_urls["postgres"])
    preamble = f"Shared preamble {uuid.uuid4().hex}: a long manual on tending orchard trees. " * 30

    def cached_tokens(api_key: str, question: str) -> int:
        response = service.openai(api_key).responses.create(
            model=vllm.model, instructions=preamble, input=question, max_output_tokens=16
        )
        assert response.status in ("completed", "incomplete") and response.usage is not None
        return response.usage.input_tokens_details.cached_tokens

    assert cached_tokens(tenant_a.user_key, "When to prune?") == 0
    assert cached_tokens(tenant_a.user_key, "When to water?") > 0
    # The same preamble under the other tenant's key: its salt makes every block a miss.
    assert cached_tokens(tenant_b.user_key, "When to prune?") == 0
    assert cached_tokens(tenant_b.user_key, "When to water?") > 0
