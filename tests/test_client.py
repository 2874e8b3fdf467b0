"""convstate-client against a live service: the same admin API sync and async, the decision header, and
the `convstate tenants|keys|admin` commands built on it."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import pytest
from convstate_client import ApiError, AsyncClient, Client, Decision, decision

from tests.conftest import Service, wait_for_artifact

MODEL = "ref-chatml"


@pytest.fixture
def cache_service(service_factory: Any) -> Service:
    service: Service = service_factory("postgres", backend_mode="cache_ref")
    return service


def test_tenants_keys_inspect_and_stats(cache_service: Service) -> None:
    admin = cache_service.admin()
    tenant = f"client-{os.urandom(4).hex()}"
    created = admin.create_tenant(tenant, response_ttl_days=7)
    assert created["response_ttl_days"] == 7 and len(created["salt_id"]) == 16
    assert tenant in {row["id"] for row in admin.tenants()["data"]}
    with pytest.raises(ApiError) as exists:
        admin.create_tenant(tenant)
    assert (exists.value.status, exists.value.code) == (400, "tenant_exists")
    key = admin.create_key(tenant, "user", "ci")
    assert key["key"].startswith("sk-cs-") and key["tenant"] == tenant
    assert [row["id"] for row in admin.keys(tenant)["data"]] == [key["id"]]
    assert "key" not in admin.keys(tenant)["data"][0]  # the secret is never listed

    client = cache_service.openai(key["key"])
    first = client.responses.with_raw_response.create(model=MODEL, input="one", instructions="Brief.")
    second = client.responses.with_raw_response.create(
        model=MODEL, input="two", instructions="Brief.", previous_response_id=first.parse().id
    )
    assert decision(first.headers) == Decision("full", "no_parent")
    assert decision({}) is None
    parsed = decision(second.headers)
    assert parsed is not None and (parsed.path, parsed.reason, parsed.reused) == ("cache_ref", "hit", True)

    turns = admin.lineage(second.parse().id)["turns"]
    assert [turn["decision"] for turn in turns] == [
        {"path": "full", "reason": "no_parent"},
        {"path": "cache_ref", "reason": "hit"},
    ]
    last = turns[-1]
    assert last["handle"]["state"] == "valid" and last["handle"]["ref"]
    assert last["prefix_hash"] and last["safe_tokens"] and last["bytes_sent"]
    assert last["tenant"] == tenant and last["lineage_root"] == turns[0]["id"]

    stats = admin.stats(tenant=tenant)
    (group,) = stats["groups"]
    assert (group["tenant"], group["model"], group["turns"], group["reused"]) == (tenant, MODEL, 2, 1)
    assert group["hit_rate"] == 1.0 and group["fallbacks"] == 0
    assert group["decisions"] == {"full; reason=no_parent": 1, "cache_ref; reason=hit": 1}
    assert stats["total"]["turns"] == 2

    revoked = admin.revoke_key(key["id"], "rotated")
    assert revoked["revoked_at"] is not None


async def test_the_async_client_has_the_same_methods(cache_service: Service) -> None:
    async with AsyncClient(cache_service.url, cache_service.admin_key) as admin:
        tenants = await admin.tenants()
        assert cache_service.tenant in {row["id"] for row in tenants["data"]}
        conversation = cache_service.openai().conversations.create().id
        inspection = await admin.conversation_turns(conversation)
        assert (inspection["object"], inspection["id"], inspection["turns"]) == (
            "conversation",
            conversation,
            [],
        )
        with pytest.raises(ApiError) as missing:
            await admin.lineage("resp_nope")
        assert missing.value.status == 404
    with Client(cache_service.url, cache_service.api_key) as user, pytest.raises(ApiError) as denied:
        user.stats()
    assert (denied.value.status, denied.value.code) == (403, "admin_required")


def _convstate(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service.cli", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_commands(cache_service: Service) -> None:
    database = {"CONVSTATE_DATABASE_URL": cache_service.settings.database_url}
    tenant = f"cli-{os.urandom(4).hex()}"
    assert _convstate("tenants", "create", tenant, **database).returncode == 0
    assert tenant in _convstate("tenants", "list", **database).stdout
    created = _convstate("keys", "create", "--tenant", tenant, "--role", "admin", **database)
    assert created.returncode == 0, created.stderr
    secret = created.stdout.strip()
    assert secret.startswith("sk-cs-") and "shown once" in created.stderr
    missing = _convstate("keys", "create", "--tenant", "no-such-tenant", **database)
    assert missing.returncode == 1 and "no tenant" in missing.stderr

    admin = {"CONVSTATE_ADMIN_URL": cache_service.url, "CONVSTATE_ADMIN_KEY": secret}
    stats = _convstate("admin", "stats", "--tenant", tenant, **admin)
    assert stats.returncode == 0 and '"turns": 0' in stats.stdout, stats.stderr
    invalidated = _convstate("admin", "invalidate", "tenant", tenant, "--reason", "cli test", **admin)
    assert invalidated.returncode == 0 and '"actor": "key_' in invalidated.stdout, invalidated.stderr
    wrong = _convstate("admin", "invalidate", "planet", "x", **admin)
    assert wrong.returncode == 1 and "400" in wrong.stderr
    turn = cache_service.openai().responses.create(model=MODEL, input="ids, please")
    wait_for_artifact(cache_service.admin(), turn.id)
    artifact = _convstate("admin", "artifact", turn.id, "--around", "4", **admin)
    assert artifact.returncode == 0 and '"prompt_token_ids"' in artifact.stdout, artifact.stderr
    rates = _convstate("admin", "append-safety", "--model", MODEL, **admin)
    assert rates.returncode == 0 and '"data"' in rates.stdout, rates.stderr

    key_id = _convstate("keys", "list", "--tenant", tenant, **database).stdout.split()[0]
    assert _convstate("keys", "revoke", key_id, **database).returncode == 0
    assert "revoked" in _convstate("keys", "list", "--tenant", tenant, **database).stdout
