"""Responses in a conversation: history from the conversation, items appended after each turn, the cache
path across turns, edits that invalidate it, and the per-conversation lock."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import Service
from tests.oracle import full_render_digest

MODEL = "ref-chatml"


@pytest.fixture
def cache_service(service_factory: Any) -> Service:
    service: Service = service_factory("postgres", backend_mode="cache_ref")
    return service


def _turn(client: openai.OpenAI, conversation: str, text: str) -> tuple[Any, Any]:
    raw = client.responses.with_raw_response.create(model=MODEL, conversation=conversation, input=text)
    return raw.parse(), raw.headers


@contextmanager
def _while_a_turn_runs(
    client: openai.OpenAI, conversation: str, backend_admin: httpx.Client, latency_ms: int, after: float
) -> Iterator[list[Any]]:
    """A turn on the conversation, slowed down by the backend, runs in a thread; the block starts
    `after` seconds into it, and the list holds the turn's response once the block is done."""
    backend_admin.post("/admin/latency", json={"ms": latency_ms}).raise_for_status()
    results: list[Any] = []
    try:
        slow = threading.Thread(target=lambda: results.append(_turn(client, conversation, "slow")[0]))
        slow.start()
        threading.Event().wait(after)
        yield results
        slow.join()
    finally:
        backend_admin.post("/admin/latency", json={"ms": 0}).raise_for_status()


def test_three_turn_conversation_uses_the_cache_and_appends_items(cache_service: Service) -> None:
    client = cache_service.openai()
    conversation = client.conversations.create(items=[{"role": "user", "content": "Remember: blue."}])
    history: list[dict[str, Any]] = [{"role": "user", "content": "Remember: blue."}]
    decisions = []
    for text in ("What colour?", "Why?", "Thanks."):
        response, headers = _turn(client, conversation.id, text)
        history.append({"role": "user", "content": text})
        assert headers["x-convstate-prompt-digest"] == full_render_digest(
            cache_service.settings.backend_url, MODEL, history
        )
        history.append({"role": "assistant", "content": response.output_text})
        assert response.conversation is not None and response.conversation.id == conversation.id
        decisions.append(headers["x-convstate-decision"])
    assert decisions == ["full; reason=no_parent", "cache_ref; reason=hit", "cache_ref; reason=hit"]
    items = list(client.conversations.items.list(conversation.id, order="asc"))
    assert [item.type for item in items] == ["message"] * 7
    assert [getattr(item, "role", None) for item in items] == ["user"] + ["user", "assistant"] * 3


def test_editing_the_conversation_invalidates_the_handle(cache_service: Service) -> None:
    client = cache_service.openai()
    conversation = client.conversations.create()
    first, _ = _turn(client, conversation.id, "one")
    added = client.conversations.items.create(
        conversation.id, items=[{"role": "user", "content": "an aside"}]
    )
    second, headers = _turn(client, conversation.id, "two")
    assert headers["x-convstate-decision"] == "full; reason=history_edited"
    messages = [
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "an aside"},
        {"role": "user", "content": "two"},
    ]
    assert headers["x-convstate-prompt-digest"] == full_render_digest(
        cache_service.settings.backend_url, MODEL, messages
    )
    _, headers = _turn(client, conversation.id, "three")
    assert headers["x-convstate-decision"] == "cache_ref; reason=hit"
    added_id = added.data[0].id
    assert added_id is not None
    client.conversations.items.delete(added_id, conversation_id=conversation.id)
    _, headers = _turn(client, conversation.id, "four")
    assert headers["x-convstate-decision"] == "full; reason=history_edited"
    assert second.status == "completed"


def test_a_second_turn_while_one_runs_is_refused(cache_service: Service, backend_admin: httpx.Client) -> None:
    client = cache_service.openai()
    conversation = client.conversations.create()
    with (
        _while_a_turn_runs(client, conversation.id, backend_admin, 800, after=0.3) as results,
        pytest.raises(openai.BadRequestError) as caught,
    ):
        client.responses.create(model=MODEL, conversation=conversation.id, input="impatient")
    assert caught.value.code == "conversation_locked"
    items = list(client.conversations.items.list(conversation.id, order="asc"))
    assert [getattr(item, "role", None) for item in items] == ["user", "assistant"]  # nothing interleaved
    assert results[0].status == "completed"
    follow, _ = _turn(client, conversation.id, "now")  # the lock was released
    assert follow.status == "completed"


def test_streamed_and_background_turns_join_the_conversation(cache_service: Service) -> None:
    client = cache_service.openai()
    conversation = client.conversations.create()
    events = list(
        client.responses.create(model=MODEL, conversation=conversation.id, input="stream", stream=True)
    )
    assert events[-1].type == "response.completed"
    queued = client.responses.create(
        model=MODEL, conversation=conversation.id, input="later", background=True
    )
    for _ in range(200):
        if client.responses.retrieve(queued.id).status == "completed":
            break
        threading.Event().wait(0.05)
    roles = [
        getattr(item, "role", None) for item in client.conversations.items.list(conversation.id, order="asc")
    ]
    assert roles == ["user", "assistant", "user", "assistant"]


def test_conversation_errors(cache_service: Service) -> None:
    http = cache_service.http()
    client = cache_service.openai()
    first = client.responses.create(model=MODEL, input="x")
    conversation = client.conversations.create()
    both = http.post(
        "/v1/responses",
        json={
            "model": MODEL,
            "input": "x",
            "conversation": conversation.id,
            "previous_response_id": first.id,
        },
    )
    assert both.status_code == 400 and both.json()["error"]["code"] == "mutually_exclusive_parameters"
    missing = http.post("/v1/responses", json={"model": MODEL, "input": "x", "conversation": "conv_missing"})
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "conversation"
    by_object = http.post(
        "/v1/responses", json={"model": MODEL, "input": "x", "conversation": {"id": conversation.id}}
    )
    assert by_object.status_code == 200 and by_object.json()["conversation"] == {"id": conversation.id}


def test_item_edits_are_refused_while_a_turn_runs(
    cache_service: Service, backend_admin: httpx.Client
) -> None:
    """Adding or deleting items while a turn runs is refused: nothing lands before the turn's input."""
    client = cache_service.openai()
    conversation = client.conversations.create(items=[{"role": "user", "content": "first"}])
    first_item = next(iter(client.conversations.items.list(conversation.id))).id
    assert first_item is not None
    with _while_a_turn_runs(client, conversation.id, backend_admin, 1500, after=0.5) as results:
        with pytest.raises(openai.BadRequestError) as added:
            client.conversations.items.create(conversation.id, items=[{"role": "user", "content": "aside"}])
        with pytest.raises(openai.BadRequestError) as deleted:
            client.conversations.items.delete(first_item, conversation_id=conversation.id)
    for caught in (added, deleted):
        assert caught.value.code == "conversation_locked" and caught.value.param == "conversation"
    assert results[0].status == "completed"
    items = list(client.conversations.items.list(conversation.id, order="asc"))
    assert [getattr(item, "role", None) for item in items] == ["user", "user", "assistant"]
    client.conversations.items.create(conversation.id, items=[{"role": "user", "content": "now"}])


def test_a_turn_longer_than_its_lease_keeps_the_lock(
    service_factory: Any, backend_admin: httpx.Client
) -> None:
    """The running turn's heartbeat renews the lock: a turn that outlasts the lease still holds it, and
    still joins the conversation when it completes."""
    service: Service = service_factory("postgres", backend_mode="cache_ref", turn_lease_seconds=3)
    client = service.openai()
    conversation = client.conversations.create()
    with (
        _while_a_turn_runs(client, conversation.id, backend_admin, 5000, after=4.5) as results,  # past 3 s
        pytest.raises(openai.BadRequestError) as caught,
    ):
        client.conversations.items.create(conversation.id, items=[{"role": "user", "content": "aside"}])
    assert caught.value.code == "conversation_locked"
    assert results[0].status == "completed"
    items = list(client.conversations.items.list(conversation.id, order="asc"))
    assert [getattr(item, "role", None) for item in items] == ["user", "assistant"]
