"""The cache-reference path end to end: hits, flat bytes, O(1) SQL, and every typed miss recovered
invisibly with the right recorded reason."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import httpx
import openai
import pytest
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from service.store.models import PrefixRecord
from tests.conftest import Service, sql_statements
from tests.oracle import full_render_digest


@pytest.fixture
def cache_service(service_factory: Any) -> Service:
    """Misses here are resent whole; reseeding from token artifacts is tests/test_e2e_artifacts.py's."""
    service: Service = service_factory("postgres", backend_mode="cache_ref", reseed="render")
    return service


def _turn(
    client: openai.OpenAI, previous: str | None, text: str, **kwargs: Any
) -> tuple[Any, Mapping[str, str]]:
    raw = client.responses.with_raw_response.create(
        model=kwargs.pop("model", "ref-chatml"), input=text, previous_response_id=previous, **kwargs
    )
    return raw.parse(), raw.headers


async def _record(engine: AsyncEngine, response_id: str) -> dict[str, Any]:
    async with engine.connect() as conn:
        row = (await conn.execute(select(PrefixRecord).where(PrefixRecord.response_id == response_id))).one()
    return dict(row._mapping)


def test_hundred_turns_hit_with_flat_bytes_and_constant_sql(cache_service: Service) -> None:
    client = cache_service.openai()
    previous, decisions, sent, statements, history = None, [], [], [], []
    for turn in range(100):
        text = f"Turn {turn}: tell me more."
        response, headers = _turn(client, previous, text, instructions="Be brief.", max_output_tokens=64)
        history += [{"role": "user", "content": text}]
        assert headers["x-convstate-prompt-digest"] == full_render_digest(
            cache_service.settings.backend_url,
            "ref-chatml",
            [{"role": "system", "content": "Be brief."}, *history],
        )
        history += [{"role": "assistant", "content": response.output_text}]
        decisions.append(headers["x-convstate-decision"])
        sent.append(int(headers["x-convstate-bytes-sent"]))
        statements.append(sql_statements(headers))
        previous = response.id
    assert decisions[0] == "full; reason=no_parent"
    assert set(decisions[1:]) == {"cache_ref; reason=hit"}
    assert sent[99] <= 2 * sent[1]
    assert statements[1] == statements[99]


def _chain(client: openai.OpenAI, turns: int, **kwargs: Any) -> str:
    previous = None
    for turn in range(turns):
        response, _ = _turn(client, previous, f"warm-up {turn}", **kwargs)
        previous = response.id
    assert previous is not None
    return str(previous)


async def _doctor(engine: AsyncEngine, response_id: str, **values: Any) -> None:
    async with engine.begin() as conn:
        await conn.execute(
            update(PrefixRecord).where(PrefixRecord.response_id == response_id).values(**values)
        )


@pytest.mark.parametrize("miss", ["unknown_ref", "expired", "fingerprint_mismatch", "prefix_mismatch"])
async def test_every_typed_miss_is_recovered_invisibly(
    cache_service: Service, backend_admin: httpx.Client, pg_engine: AsyncEngine, miss: str
) -> None:
    client = cache_service.openai()
    parent = _chain(client, 2)
    if miss == "unknown_ref":
        backend_admin.post("/admin/evict", json={}).raise_for_status()
    elif miss == "expired":
        backend_admin.post("/admin/expire").raise_for_status()
    elif miss == "fingerprint_mismatch":
        await _doctor(pg_engine, parent, backend_fingerprint="0" * 32)
    else:
        await _doctor(pg_engine, parent, prefix_hash="0" * 32)
    response, headers = _turn(client, parent, "after the miss")
    assert response.status == "completed"
    assert headers["x-convstate-decision"] == f"full; reason=backend_miss:{miss}"
    record = await _record(pg_engine, response.id)
    assert (record["decision_path"], record["decision_reason"]) == ("full", f"backend_miss:{miss}")
    assert record["handle_ref"] is not None  # re-seeded
    assert record["handle_endpoint"] == cache_service.settings.backend_url
    _, headers = _turn(client, response.id, "and again")
    assert headers["x-convstate-decision"] == "cache_ref; reason=hit"


async def test_late_system_message_is_not_appendable_on_system_once(
    cache_service: Service, pg_engine: AsyncEngine
) -> None:
    client = cache_service.openai()
    parent = _chain(client, 2, model="ref-system-once")
    raw = client.responses.with_raw_response.create(
        model="ref-system-once",
        previous_response_id=parent,
        input=[{"role": "system", "content": "New rule."}, {"role": "user", "content": "go on"}],
    )
    assert raw.headers["x-convstate-decision"] == "full; reason=backend_miss:not_appendable"
    assert raw.parse().status == "completed"


def test_backend_restart_then_hits_again(cache_service: Service, backend_admin: httpx.Client) -> None:
    client = cache_service.openai()
    parent = _chain(client, 2)
    backend_admin.post("/admin/restart").raise_for_status()
    response, headers = _turn(client, parent, "after restart")
    assert headers["x-convstate-decision"] in (
        "full; reason=backend_miss:unknown_ref",
        "full; reason=backend_epoch_changed",
    )
    _, headers = _turn(client, response.id, "again")
    assert headers["x-convstate-decision"] == "cache_ref; reason=hit"


def test_changed_settings_decide_full_with_the_reason(cache_service: Service) -> None:
    client = cache_service.openai()
    tool = {"type": "function", "name": "lookup", "parameters": {"type": "object", "properties": {}}}
    parent = _chain(client, 1, instructions="A")
    cases: list[tuple[dict[str, Any], str]] = [
        ({"instructions": "B"}, "full; reason=instructions_changed"),
        ({"instructions": "B"}, "cache_ref; reason=hit"),
        ({"instructions": "B", "tools": [tool]}, "full; reason=tools_changed"),
        (
            {"instructions": "B", "tools": [tool], "reasoning": {"effort": "low"}},
            "full; reason=reasoning_changed",
        ),
        ({"instructions": "B", "tools": [tool], "reasoning": {"effort": "low"}}, "cache_ref; reason=hit"),
    ]
    for kwargs, expected in cases:
        response, headers = _turn(client, parent, "next", **kwargs)
        assert headers["x-convstate-decision"] == expected
        parent = response.id


def test_store_false_goes_full_and_is_not_registered(cache_service: Service) -> None:
    client = cache_service.openai()
    parent = _chain(client, 1)
    _, headers = _turn(client, parent, "ephemeral", store=False)
    assert headers["x-convstate-decision"] == "full; reason=store_false"
