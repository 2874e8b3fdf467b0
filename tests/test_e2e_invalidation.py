"""Scoped invalidation end to end: each scope makes the next turn under it decide `full; reason=invalidated`,
two replicas on one database honour an invalidation made through either within a second (NOTIFY on
Postgres, the poll on SQLite), and a scope covering 10,000 turns is one row."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from sqlalchemy import func, insert, select

from service.store.db import create_engine, dispose
from service.store.migrate import upgrade
from service.store.models import Invalidation, PrefixRecord, Response
from tests.conftest import Service, new_tenant, sql_statements, start_service

MODEL = "ref-chatml"
LAG = 0.5  # a short max lag, so the window after an invalidation (lag + 1 s) passes quickly here


def _turn(client: openai.OpenAI, previous: str | None, text: str = "next", **kwargs: Any) -> tuple[str, str]:
    raw = client.responses.with_raw_response.create(
        model=MODEL, input=text, previous_response_id=previous, **kwargs
    )
    return raw.parse().id, raw.headers["x-convstate-decision"]


def _chain(client: openai.OpenAI, turns: int) -> list[str]:
    ids: list[str] = []
    for turn in range(turns):
        response_id, _ = _turn(client, ids[-1] if ids else None, f"turn {turn}")
        ids.append(response_id)
    return ids


HIT = "cache_ref; reason=hit"
INVALIDATED = "full; reason=invalidated"


@pytest.fixture(scope="module")
def own_database(new_postgres_database: Any, reference_backend: Any) -> Iterator[Service]:
    """A service on a database of its own: model- and all-scope invalidations reach every tenant."""
    url = new_postgres_database()
    upgrade(url)
    service = start_service(url, reference_backend.url, backend_mode="cache_ref", invalidation_max_lag=LAG)
    yield service
    service.server.stop()


def test_each_scope_invalidates_what_it_covers_and_nothing_above_it(own_database: Service) -> None:
    service = own_database
    client, admin = service.openai(), service.admin()

    # A response and its descendants; not its ancestors.
    root, middle, leaf = _chain(client, 3)
    admin.invalidate("response", middle, reason="bad turn")
    assert _turn(client, leaf)[1] == INVALIDATED
    assert _turn(client, middle)[1] == INVALIDATED
    assert _turn(client, root)[1] == HIT

    conversation = client.conversations.create().id
    for text in ("one", "two"):
        client.responses.create(model=MODEL, input=text, conversation=conversation)
    admin.invalidate("conversation", conversation, reason="edited upstream")
    raw = client.responses.with_raw_response.create(model=MODEL, input="three", conversation=conversation)
    assert raw.headers["x-convstate-decision"] == INVALIDATED

    parts = admin.lineage(_chain(client, 2)[-1])["turns"][-1]["fingerprint_parts"]
    assert parts is not None
    cases: list[tuple[str, str | None, str | None]] = [
        ("fingerprint", "chat_template", parts["chat_template"]),
        ("fingerprint", None, admin.lineage(_chain(client, 2)[-1])["turns"][-1]["fingerprint"]),
        ("tenant", service.tenant, None),
        ("model", MODEL, None),
        ("all", None, None),
    ]
    for scope, key, value in cases:
        *_, parent = _chain(client, 2)
        if scope == "fingerprint":
            admin.invalidate("fingerprint", value, part=key, reason="template fix")
        else:
            admin.invalidate(scope, key, reason="operator")  # type: ignore[arg-type]
        assert _turn(client, parent)[1] == INVALIDATED, scope

    # Turns that start within the window after an invalidation are re-sent in full too; after it, the
    # re-seeded handles are reused again.
    *_, parent = _chain(client, 2)
    admin.invalidate("model", MODEL, reason="once more")
    time.sleep(LAG + 1.1)
    reseeded, decision = _turn(client, parent)
    assert decision == INVALIDATED
    assert _turn(client, reseeded)[1] == HIT
    audit = admin.invalidations(limit=3)["data"]
    assert (audit[0]["scope"], audit[0]["reason"]) == ("model", "once more")
    assert audit[0]["actor"].startswith("key_")


def test_bad_scopes_are_400(service: Service) -> None:
    admin = service.http(service.admin_key)
    for body, param in [
        ({"scope": "all", "key": "x", "reason": "r"}, "key"),
        ({"scope": "tenant", "reason": "r"}, "key"),
        ({"scope": "fingerprint", "key": "ab", "part": "nope", "reason": "r"}, "part"),
        ({"scope": "model", "key": "m", "part": "tools", "reason": "r"}, "part"),
        ({"scope": "galaxy", "key": "m", "reason": "r"}, "scope"),
        ({"scope": "all"}, "reason"),
    ]:
        reply = admin.post("/admin/v1/invalidations", json=body)
        assert reply.status_code == 400, body
        assert reply.json()["error"]["param"] == param
    missing = admin.post(
        "/admin/v1/invalidations", json={"scope": "response", "key": "resp_nope", "reason": "r"}
    )
    assert missing.status_code == 404


def _state(service: Service, response_id: str) -> str:
    state: str = service.admin().lineage(response_id)["turns"][-1]["handle"]["state"]
    return state


@pytest.mark.parametrize("dialect", ["postgres", "sqlite"])
def test_another_replica_honours_an_invalidation_within_a_second(
    migrated_urls: dict[str, str], reference_backend: Any, dialect: str
) -> None:
    url = migrated_urls[dialect]
    first = start_service(url, reference_backend.url, backend_mode="cache_ref")
    second = start_service(url, reference_backend.url, backend_mode="cache_ref")
    try:
        *_, parent = _chain(first.openai(), 2)
        assert _state(second, parent) == "valid"
        first.admin().invalidate("response", parent, reason="replica test")
        made = time.monotonic()
        while _state(second, parent) != "invalidated:scope":
            assert time.monotonic() - made < 1.0, "not honoured within 1 s"
            time.sleep(0.01)
        assert _turn(second.openai(first.api_key), parent)[1] == INVALIDATED
    finally:
        first.server.stop()
        second.server.stop()


async def _seed(url: str, tenant: str, turns: int) -> None:
    """`turns` stored turns with valid prefix records, written directly (the service would take minutes)."""
    now = time.time()
    ids = [f"resp_seed{uuid.uuid4().hex}" for _ in range(turns)]
    responses = [
        {
            "id": response_id,
            "tenant": tenant,
            "model": MODEL,
            "status": "completed",
            "depth": 0,
            "lineage_root": response_id,
            "settings": {},
            "store": True,
            "background": False,
            "cancel_requested": False,
            "created_at": now,
            "expires_at": now + 3600,
        }
        for response_id in ids
    ]
    records = [
        {
            "response_id": response_id,
            "tenant": tenant,
            "model": MODEL,
            "status": "valid",
            "decision_path": "full",
            "decision_reason": "no_parent",
            "bytes_sent": 0,
            "fingerprint_parts": {},
            "created_at": now,
        }
        for response_id in ids
    ]
    engine = create_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.execute(insert(Response), responses)
            await conn.execute(insert(PrefixRecord), records)
    finally:
        await dispose(engine)


async def _counts(url: str, tenant: str) -> tuple[int, int]:
    """(invalidation rows, the tenant's valid prefix records)."""
    engine = create_engine(url)
    try:
        async with engine.connect() as conn:
            invalidations = (await conn.execute(select(func.count()).select_from(Invalidation))).scalar_one()
            valid = (
                await conn.execute(
                    select(func.count()).where(PrefixRecord.tenant == tenant, PrefixRecord.status == "valid")
                )
            ).scalar_one()
    finally:
        await dispose(engine)
    return invalidations, valid


def test_a_scope_covering_ten_thousand_turns_is_one_row(cache_service_factory: Any) -> None:
    service: Service = cache_service_factory
    url = service.settings.database_url
    big, small = new_tenant(url), new_tenant(url)
    asyncio.run(_seed(url, big.tenant, 10_000))
    *_, parent = _chain(service.openai(big.user_key), 2)
    before = asyncio.run(_counts(url, big.tenant))
    admin = service.http(service.admin_key)
    admin.get("/admin/v1/invalidations", params={"limit": 1})  # the admin key is cached from here on
    statements = []
    for tenant in (big.tenant, small.tenant):
        reply = admin.post("/admin/v1/invalidations", json={"scope": "tenant", "key": tenant, "reason": "x"})
        assert reply.status_code == 200, reply.text
        statements.append(sql_statements(reply.headers))
    after = asyncio.run(_counts(url, big.tenant))
    assert before[1] == 10_002  # the seeded turns and the chain's two
    assert after == (before[0] + 2, before[1])  # one row per call; no record was touched
    assert statements[0] == statements[1]  # the same statements for 10,002 turns as for none
    assert _turn(service.openai(big.user_key), parent)[1] == INVALIDATED


@pytest.fixture
def cache_service_factory(service_factory: Any) -> Service:
    service: Service = service_factory("postgres", backend_mode="cache_ref")
    return service


def test_salt_rotation_stops_every_handle_of_the_tenant(cache_service_factory: Service) -> None:
    service = cache_service_factory
    tenant = new_tenant(service.settings.database_url)
    client = service.openai(tenant.user_key)
    *_, parent = _chain(client, 2)
    *_, other = _chain(client, 2)
    admin = service.admin()
    before = admin.tenant(tenant.tenant)["salt_id"]
    rotated = admin.rotate_salt(tenant.tenant, "suspected leak")
    assert rotated["salt_id"] != before
    assert _turn(client, parent)[1] == "full; reason=fingerprint_mismatch:cache_salt"
    reseeded, decision = _turn(client, other)
    assert decision == "full; reason=fingerprint_mismatch:cache_salt"
    assert _turn(client, reseeded)[1] == HIT  # handles made under the new salt are reused
    assert admin.invalidations(limit=1)["data"][0]["scope"] == "tenant_config"
