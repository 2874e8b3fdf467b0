"""Managing the replay cache over real HTTP: statistics, listing and deletion by tenant, model, key prefix
and age through the admin API and `convstate cache`, a JSONL export imported back, a tenant's opt-in,
the hit and miss counters in /metrics, and the evaluation guide's example run as written."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import uuid
from typing import Any

import httpx
import pytest
from convstate_client import ApiError

from tests.conftest import Credentials, Service, new_tenant, repo_root

USE = {"x-convstate-cache": "use"}


def cached_chat(
    service: Service, model: str, key: str | None = None, headers: dict[str, str] | None = None
) -> httpx.Response:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": f"Admin {uuid.uuid4().hex}"}],
        "temperature": 0,
        "max_tokens": 16,
    }
    with service.http(key) as http:
        reply = http.post("/v1/chat/completions", json=body, headers=USE if headers is None else headers)
    assert reply.status_code == 200, reply.text
    return reply


@pytest.fixture
def tenant(service: Service) -> Credentials:
    """A tenant of its own: its entries and its opt-in touch no other test."""
    return new_tenant(service.settings.database_url)


def test_stats_list_and_delete_by_selection(service: Service, tenant: Credentials) -> None:
    admin = service.admin()
    chatml = [
        cached_chat(service, "ref-chatml", tenant.user_key).headers["x-convstate-cache-key"] for _ in range(2)
    ]
    other = cached_chat(service, "ref-system-once", tenant.user_key).headers["x-convstate-cache-key"]
    stats = admin.replay_stats(tenant=tenant.tenant)
    assert [(group["model"], group["entries"]) for group in stats["data"]] == [
        ("ref-chatml", 2),
        ("ref-system-once", 1),
    ]
    assert stats["entries"] == 3 and stats["bytes"] > 0
    listed = admin.replay_entries(tenant.tenant)
    assert [entry["key"] for entry in listed["data"]] == [*chatml, other] and listed["next"] is None
    assert "result" not in listed["data"][0]
    assert [entry["key"] for entry in admin.replay_entries(key_prefix=other[:12])["data"]] == [other]
    assert admin.replay_entries(tenant.tenant, older_than=3600)["data"] == []
    page = admin.replay_entries(tenant.tenant, limit=2)
    assert page["next"] is not None
    assert [e["key"] for e in admin.replay_entries(tenant.tenant, after=page["next"])["data"]] == [other]

    assert admin.replay_delete(key_prefix=chatml[0][:12])["deleted"] == 1
    assert admin.replay_delete(tenant.tenant, model="ref-system-once")["deleted"] == 1
    assert [entry["key"] for entry in admin.replay_entries(tenant.tenant)["data"]] == [chatml[1]]
    with pytest.raises(ApiError) as unnamed:
        admin.replay_delete()
    assert (unnamed.value.status, unnamed.value.param) == (400, "all")
    with pytest.raises(ApiError) as pattern:
        admin.replay_entries(key_prefix="%")
    assert pattern.value.status == 400


def test_user_keys_may_not_manage_the_cache(service: Service) -> None:
    with service.http() as http:
        refused = http.get("/admin/v1/replay/stats")
    assert (refused.status_code, refused.json()["error"]["code"]) == (403, "admin_required")


def test_a_tenant_opts_in_and_out(service: Service, tenant: Credentials) -> None:
    admin = service.admin()
    plain: dict[str, str] = {}
    assert cached_chat(service, "ref-chatml", tenant.user_key, plain).headers["x-convstate-cache"] == "bypass"
    admin.set_retention(tenant.tenant, 7)
    assert admin.set_replay_cache(tenant.tenant, True)["replay_cache"] is True
    assert admin.tenant(tenant.tenant)["response_ttl_days"] == 7  # the other field is left as it was
    # Every replica reads the tenant again within the invalidation max lag.
    assert (
        eventually(
            lambda: cached_chat(service, "ref-chatml", tenant.user_key, plain).headers["x-convstate-cache"]
        )
        == "miss"
    )
    assert admin.set_replay_cache(tenant.tenant, False)["replay_cache"] is False
    assert (
        eventually(
            lambda: cached_chat(service, "ref-chatml", tenant.user_key, plain).headers["x-convstate-cache"],
            "miss",
        )
        == "bypass"
    )


def eventually(read: Any, unwanted: str = "bypass", seconds: float = 10.0) -> str:
    deadline = time.monotonic() + seconds
    while True:
        value: str = read()
        if value != unwanted or time.monotonic() > deadline:
            return value
        time.sleep(0.2)


def _convstate(*args: str, stdin: str | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service.cli", *args],
        env={**os.environ, **env},
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_cache_commands_export_and_import(service: Service, tenant: Credentials) -> None:
    env = {"CONVSTATE_ADMIN_URL": service.url, "CONVSTATE_ADMIN_KEY": service.admin_key}
    keys = [
        cached_chat(service, "ref-chatml", tenant.user_key).headers["x-convstate-cache-key"] for _ in range(3)
    ]
    stats = _convstate("cache", "stats", "--tenant", tenant.tenant, **env)
    assert stats.returncode == 0 and '"entries": 3' in stats.stdout, stats.stderr
    listed = _convstate("cache", "list", "--tenant", tenant.tenant, "--limit", "2", **env)
    assert listed.returncode == 0 and keys[0] in listed.stdout and keys[2] not in listed.stdout

    exported = _convstate("cache", "export", "--tenant", tenant.tenant, **env)
    assert exported.returncode == 0 and '"exported": 3' in exported.stderr, exported.stderr
    lines = exported.stdout.splitlines()
    assert len(lines) == 3 and all('"result"' in line and '"request"' in line for line in lines)
    deleted = _convstate("cache", "delete", "--tenant", tenant.tenant, **env)
    assert deleted.returncode == 0 and '"deleted": 3' in deleted.stdout
    assert cached_chat(
        service, "ref-chatml", tenant.user_key, {"x-convstate-cache": "bypass"}
    )  # nothing left
    imported = _convstate("cache", "import", stdin=exported.stdout, **env)
    assert imported.returncode == 0 and '"imported": 3' in imported.stdout, imported.stderr
    assert [entry["key"] for entry in service.admin().replay_entries(tenant.tenant)["data"]] == keys

    unnamed = _convstate("cache", "delete", **env)
    assert unnamed.returncode == 1 and "400" in unnamed.stderr
    enabled = _convstate("cache", "enable", tenant.tenant, **env)
    assert enabled.returncode == 0 and '"replay_cache": true' in enabled.stdout


def test_metrics_count_hits_and_misses(service: Service) -> None:
    body = {
        "model": "ref-chatml",
        "messages": [{"role": "user", "content": uuid.uuid4().hex}],
        "temperature": 0,
    }
    with service.http() as http:
        answers = [
            http.post("/v1/chat/completions", json=body, headers=USE).headers["x-convstate-cache"]
            for _ in range(2)
        ]
    assert answers == ["miss", "hit"]
    text = httpx.get(service.url + "/metrics").text
    for result in ("miss", "hit"):
        assert re.search(
            rf'convstate_replay_requests_total\{{endpoint="chat.completions",result="{result}"\}} [1-9]', text
        )


def test_the_evaluation_guide_example_runs(service: Service, tenant: Credentials) -> None:
    guide = (repo_root() / "docs" / "evaluation.md").read_text()
    example = re.search(r"```python\n(.*?)```", guide, re.DOTALL)
    assert example is not None
    env = {**os.environ, "CONVSTATE_URL": service.url, "CONVSTATE_KEY": tenant.user_key}
    ran = subprocess.run(
        [sys.executable, "-c", example.group(1)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert ran.returncode == 0, ran.stderr
    lines = [line.split(" ", 3) for line in ran.stdout.splitlines()]
    assert [(run, cache) for run, cache, _, _ in lines] == [("1", "miss")] * 3 + [("2", "hit")] * 3
    assert [text for _, _, _, text in lines[:3]] == [text for _, _, _, text in lines[3:]]


def test_an_import_beyond_the_columns_range_is_a_400(service: Service, tenant: Credentials) -> None:
    """An entry's byte count is stored in a 32-bit column: a larger one is refused, not a 500."""
    entry: dict[str, Any] = {
        "tenant": tenant.tenant,
        "key": "ab" * 32,
        "endpoint": "chat.completions",
        "model": "ref-chatml",
        "fingerprint": None,
        "bytes": 2**32,
        "created_at": time.time(),
        "expires_at": time.time() + 60,
        "request": {},
        "result": {},
    }
    with service.http(service.admin_key) as http:
        refused = http.post("/admin/v1/replay/import", json={"entries": [entry]})
    assert refused.status_code == 400, refused.text
    assert refused.json()["error"]["param"] == "entries[0].bytes"


def test_an_import_takes_a_key_twice_once_and_refuses_what_the_table_cannot_hold(
    service: Service, tenant: Credentials
) -> None:
    admin = service.admin()
    key = cached_chat(service, "ref-chatml", tenant.user_key).headers["x-convstate-cache-key"]
    (stored,) = admin.replay_entries(tenant.tenant, whole=True)["data"]
    entry: Any = dict(stored)
    newer: Any = {**entry, "created_at": entry["created_at"] + 1, "result": {"id": "newer"}}
    assert admin.replay_import([entry, newer])["imported"] == 1
    assert admin.replay_entries(tenant.tenant, whole=True)["data"][0]["result"] == {"id": "newer"}
    bad: Any
    for bad in (
        {"bytes": 2**31},
        {"endpoint": "embeddings"},
        {"status": "pending"},
        {"key": key[:10]},
        {"endpoint": "responses"},  # a chat completion is not what a Responses turn is rebuilt from
    ):
        broken: Any = {**entry, **bad}
        with pytest.raises(ApiError) as refused:
            admin.replay_import([broken])
        assert refused.value.status == 400, bad
