"""Token artifacts, reseed and KV-affine routing through the service over real HTTP: every stored turn's
ids reach the cold table without a statement on the request path; a parent whose handle is gone is
reseeded from its ids without a render of the history; affinity keeps a lineage on the replica that holds
its KV until its record stops holding; the admin API shows ids, divergences and append-safety rates."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pytest
from convstate_client import ApiError

from service.backends.reference.config import ReferenceSettings
from service.backends.reference.router import create_router
from service.backends.reference.server import create_app as create_reference_app
from service.domain.prefix import token_digest
from service.serving import ServerThread
from service.workers.invalidations import CLOCK_MARGIN
from tests.conftest import Service, sql_statements, start_service, wait_for_artifact
from tests.oracle import assistant_message, full_render_digest, recorded_digest

MODEL = "ref-chatml"


def _turns(client: openai.OpenAI) -> list[tuple[str, int, str]]:
    """(response id, SQL statements, decision) of: a first turn, a hit, a streamed hit, a conversation
    turn."""
    out = []
    previous = None
    for text in ("list the failing tests", "which one is flaky?"):
        raw = client.responses.with_raw_response.create(
            model=MODEL, input=text, previous_response_id=previous, max_output_tokens=24
        )
        previous = raw.parse().id
        out.append((previous, sql_statements(raw.headers), raw.headers["x-convstate-decision"]))
    with client.responses.with_streaming_response.create(
        model=MODEL, input="fix it", previous_response_id=previous, max_output_tokens=24, stream=True
    ) as streamed:
        events = [json.loads(line[5:]) for line in streamed.iter_lines() if line.startswith("data:")]
        response_id = events[0]["response"]["id"]
        assert events[-1]["type"] in ("response.completed", "response.incomplete")
        out.append((response_id, sql_statements(streamed.headers), streamed.headers["x-convstate-decision"]))
    conversation = client.conversations.create().id
    raw = client.responses.with_raw_response.create(
        model=MODEL, input="start over", conversation=conversation, max_output_tokens=24
    )
    out.append((raw.parse().id, sql_statements(raw.headers), raw.headers["x-convstate-decision"]))
    return out


def test_every_stored_turn_gets_its_artifact_and_the_request_path_runs_no_more_statements(
    service_factory: Callable[..., Service],
) -> None:
    with_artifacts = service_factory(backend_mode="cache_ref")
    without = service_factory(backend_mode="cache_ref", token_artifacts=False)
    for warm in (with_artifacts, without):  # a process's first request also reads its key and tenant
        warm.openai().responses.create(model=MODEL, input="warm up", max_output_tokens=16)
    turns = _turns(with_artifacts.openai())
    baseline = _turns(without.openai())
    # The same statements per turn, with the ids on their way to the table or not.
    assert [(s, d) for _, s, d in turns] == [(s, d) for _, s, d in baseline]
    assert [d for _, _, d in turns][:3] == [
        "full; reason=no_parent",
        "cache_ref; reason=hit",
        "cache_ref; reason=hit",
    ]
    admin = with_artifacts.admin()
    database_url = with_artifacts.settings.database_url
    for response_id, _, _ in turns:
        artifact = wait_for_artifact(admin, response_id)
        # The ids are those the backend generated from: their digest is the one it reported.
        assert token_digest(artifact["prompt_token_ids"]) == recorded_digest(database_url, response_id)
        assert artifact["prompt_tokens"] == len(artifact["prompt_token_ids"])
        assert artifact["output_tokens"] == len(artifact["output_token_ids"]) > 0
    chained = [wait_for_artifact(admin, response_id) for response_id, _, _ in turns[:3]]
    assert [a["parent_id"] for a in chained] == [None, turns[0][0], turns[1][0]]
    # chatml appends: each prompt continues its parent's prompt and output ids exactly.
    assert [a["append_safe"] for a in chained[1:]] == [True, True]
    divergence = chained[2]["divergence"]
    assert divergence is not None and divergence["append_safe"] and divergence["comparable"]
    for response_id, _, _ in baseline:
        with pytest.raises(ApiError) as missing:
            admin.artifact(response_id)
        assert missing.value.status == 404


@pytest.fixture
def own_backend() -> Iterator[ServerThread]:
    with ServerThread(create_reference_app(ReferenceSettings())) as server:
        yield server


def _stats(backend: ServerThread) -> dict[str, Any]:
    stats: dict[str, Any] = httpx.get(f"{backend.url}/stats").json()
    return stats


def test_a_parent_whose_handle_is_gone_is_reseeded_from_its_ids_without_rendering_the_history(
    migrated_urls: dict[str, str], own_backend: ServerThread
) -> None:
    database_url = migrated_urls["postgres"]
    # Each turn asks for the model card, so a restart is seen at once (`backend_epoch_changed`).
    fresh = {"backend_mode": "cache_ref", "backend_info_ttl": 0.001}
    service = start_service(database_url, own_backend.url, **fresh)
    render = start_service(database_url, own_backend.url, **fresh, reseed="render", token_artifacts=False)
    try:
        admin = service.admin()
        long_input = " ".join(f"step {i}: rebuild the index and rerun the suite" for i in range(40))
        messages: list[dict[str, Any]] = []
        previous = None

        def turn(text: str, via: Service = service) -> tuple[str, str]:
            nonlocal previous
            # Room to finish: a reply cut by max_output_tokens does not end its message, so its ids
            # cannot seed what the template renders after it.
            raw = via.openai().responses.with_raw_response.create(
                model=MODEL, input=text, previous_response_id=previous, max_output_tokens=512
            )
            response = raw.parse()
            messages.extend(
                [{"role": "user", "content": text}, assistant_message(response.model_dump()["output"])]
            )
            previous = response.id
            return response.id, raw.headers["x-convstate-decision"]

        turn(long_input)
        second, _ = turn("summarize")
        wait_for_artifact(admin, second)
        httpx.post(f"{own_backend.url}/admin/restart")
        before = _stats(own_backend)
        third, decision = turn("and now?")
        after = _stats(own_backend)
        assert decision == "cache_ref; reason=reseed:backend_epoch_changed"
        assert after["full_renders"] == before["full_renders"] and after["seeds"] == before["seeds"] + 1
        # Rendered: the new user message and the reply (for the new handle), none of the history.
        history_tokens = wait_for_artifact(admin, second)["prompt_tokens"]
        assert after["tokens_rendered"] - before["tokens_rendered"] < 100 < history_tokens
        # What was generated from is exactly the full render of the history.
        assert recorded_digest(database_url, third) == full_render_digest(
            own_backend.url, MODEL, messages[:-1]
        )
        assert turn("next")[1] == "cache_ref; reason=hit"  # the reseeded turn's own handle
        # A handle the backend lost without a restart: the miss is reseeded inside the same request.
        wait_for_artifact(admin, previous or "")
        httpx.post(f"{own_backend.url}/admin/evict", json={})
        fourth, decision = turn("once more")
        assert decision == "cache_ref; reason=reseed:backend_miss:unknown_ref"
        assert recorded_digest(database_url, fourth) == full_render_digest(
            own_backend.url, MODEL, messages[:-1]
        )
        # CONVSTATE_RESEED=render, or a parent without an artifact: the whole history again.
        wait_for_artifact(admin, fourth)
        httpx.post(f"{own_backend.url}/admin/restart")
        assert turn("via render", render)[1] == "full; reason=backend_epoch_changed"
        httpx.post(f"{own_backend.url}/admin/restart")
        assert turn("no ids stored for the parent")[1] == "full; reason=backend_epoch_changed"
    finally:
        service.server.stop()
        render.server.stop()


@pytest.fixture
def replicas() -> Iterator[tuple[list[ServerThread], str]]:
    servers = [ServerThread(create_reference_app(ReferenceSettings())).start() for _ in range(2)]
    names = [(f"llm-d/vllm-{i}", server.url) for i, server in enumerate(servers)]
    try:
        with ServerThread(create_router(names)) as router:
            yield servers, router.url
    finally:
        for server in servers:
            server.stop()


def test_affinity_keeps_a_lineage_on_its_replica_while_its_record_holds(
    migrated_urls: dict[str, str], replicas: tuple[list[ServerThread], str]
) -> None:
    _, router_url = replicas
    # By host name: a client cookie jar keeps cookies from names, not from IP addresses.
    backend_url = router_url.replace("127.0.0.1", "localhost")
    service = start_service(migrated_urls["postgres"], backend_url, backend_mode="affinity")
    # An invalidation also covers records made within the max lag (and a clock margin) after it.
    lag = service.settings.invalidation_max_lag
    try:
        client, admin = service.openai(), service.admin()
        previous, decisions = None, []
        tag = uuid.uuid4().hex[:8]
        for turn in range(8):
            if turn == 4:
                admin.invalidate("response", previous, reason="test")
                time.sleep(lag + CLOCK_MARGIN + 0.2)
            raw = client.responses.with_raw_response.create(
                model=MODEL,
                input=f"turn {turn}",
                previous_response_id=previous,
                max_output_tokens=16,
                extra_headers={"x-request-id": f"{tag}-{turn}"},
            )
            previous = raw.parse().id
            decisions.append(raw.headers["x-convstate-decision"])
        client.responses.create(
            model=MODEL,
            input="one more",
            previous_response_id=previous,
            max_output_tokens=16,
            safety_identifier="alice",
            extra_headers={"x-request-id": f"{tag}-own"},
        )
        routed = {row["request_id"]: row for row in httpx.get(f"{router_url}/router/log").json()}
        rows = [routed[f"{tag}-{turn}"] for turn in range(8)]
        own = routed[f"{tag}-own"]
    finally:
        service.server.stop()
    # The whole lineage is one session, in the header and as the body's `user`; a client's own identity
    # goes as it sent it.
    (session,) = {row["session_id"] for row in [*rows, own]}
    assert session.startswith("cs-") and [row["user"] for row in rows] == [session] * 8
    assert own["user"] == "alice"
    assert decisions == [
        "full; reason=no_parent",
        *["affinity; reason=hit"] * 3,
        "full; reason=invalidated",
        *["affinity; reason=hit"] * 3,
    ]
    # Each turn after the first carries the token of its parent's replica, except right after the
    # invalidation (no token: the router picks by load); the lineage then stays where that turn ran.
    assert [row["pinned"] for row in rows] == [False, True, True, True, False, True, True, True]
    assert len({row["replica"] for row in rows[:4]}) == 1 and len({row["replica"] for row in rows[4:]}) == 1


def test_append_safety_per_template_and_the_divergence_as_text(
    service_factory: Callable[..., Service],
) -> None:
    service = service_factory(backend_mode="cache_ref")
    client, admin = service.openai(), service.admin()
    observed: dict[str, list[bool | None]] = {}
    for model in ("ref-chatml", "ref-reasoning-trim"):
        previous, ids = None, []
        for text in ("plan the fix", "apply it", "verify it"):
            response = client.responses.create(
                model=model,
                input=text,
                previous_response_id=previous,
                reasoning={"effort": "low"},
                max_output_tokens=48,
            )
            previous = response.id
            ids.append(response.id)
        observed[model] = [wait_for_artifact(admin, response_id)["append_safe"] for response_id in ids]
        last = ids[-1]
    # chatml keeps the reasoning in history: append-safe; reasoning-trim drops it: never.
    assert observed == {"ref-chatml": [None, True, True], "ref-reasoning-trim": [None, False, False]}
    # system-once merges a late system message into the first block: that turn only diverges, early.
    previous, late = None, []
    turns: list[list[Any]] = [
        [{"role": "user", "content": "hello"}],
        [{"role": "developer", "content": "New rule."}, {"role": "user", "content": "go"}],
        [{"role": "user", "content": "ok"}],
    ]
    for items in turns:
        response = client.responses.create(
            model="ref-system-once", input=items, previous_response_id=previous, max_output_tokens=48
        )
        previous = response.id
        late.append(wait_for_artifact(admin, response.id))
    assert [a["append_safe"] for a in late] == [None, False, True]
    merged = late[1]["divergence"]
    assert merged is not None and merged["divergence"] is not None and merged["divergence"] < 8
    trimmed = admin.artifact(last, context=4)
    divergence = trimmed["divergence"]
    assert divergence is not None and not divergence["append_safe"]
    assert divergence["parent_text"] is not None and "<think>" in divergence["parent_text"]
    assert divergence["text"] is not None and "<think>" not in divergence["text"]
    rates = {(row["model"]): row for row in admin.append_safety()["data"]}
    assert rates["ref-chatml"]["rate"] == 1.0 and rates["ref-reasoning-trim"]["rate"] == 0.0
    assert rates["ref-reasoning-trim"]["contradicted"] == 0  # its records never claimed a safe boundary
    [inspected] = [t for t in admin.lineage(last)["turns"] if t["id"] == last]
    assert inspected["append_safe"] is False and inspected["divergence"] == divergence["divergence"]
