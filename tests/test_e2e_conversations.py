"""The Conversations API end to end: the service over real HTTP, the openai SDK as the client, Postgres
underneath. Every object is also validated strictly against the SDK's own pydantic types."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from openai.types.conversations import (
    Conversation,
    ConversationDeletedResource,
    ConversationItem,
    ConversationItemList,
)
from pydantic import TypeAdapter

from tests.conftest import Service, new_tenant

ITEM = TypeAdapter(ConversationItem)

EVERY_KIND: list[dict[str, Any]] = [
    {"role": "system", "content": "Be brief."},
    {"role": "developer", "content": [{"type": "input_text", "text": "Use tools."}]},
    {
        "type": "message",
        "role": "user",
        "content": [
            {"type": "input_text", "text": "look"},
            {"type": "input_image", "image_url": "https://example.com/a.png"},
        ],
    },
    {"type": "reasoning", "summary": [], "content": [{"type": "reasoning_text", "text": "hmm"}]},
    {"type": "function_call", "call_id": "call_1", "name": "lookup", "arguments": '{"q": 1}'},
    {"type": "function_call_output", "call_id": "call_1", "output": "42"},
    {"role": "assistant", "content": "It is 42."},
]


def _error(reply: httpx.Response) -> dict[str, Any]:
    body = reply.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    error: dict[str, Any] = body["error"]
    return error


def _conversation(client: openai.OpenAI, **kwargs: Any) -> Conversation:
    raw = client.conversations.with_raw_response.create(**kwargs)
    validated = Conversation.model_validate(raw.http_response.json())
    assert raw.parse().model_dump() == validated.model_dump()
    return validated


def _add(client: openai.OpenAI, conversation_id: str, items: list[Any]) -> ConversationItemList:
    raw = client.conversations.items.with_raw_response.create(conversation_id, items=items)
    validated = ConversationItemList.model_validate(raw.http_response.json())
    assert raw.parse().model_dump() == validated.model_dump()
    return validated


def test_conversation_lifecycle(service: Service) -> None:
    client = service.openai()
    created = _conversation(client, metadata={"topic": "demo"})
    assert created.id.startswith("conv_") and len(created.id) == 5 + 48
    assert (created.object, created.metadata) == ("conversation", {"topic": "demo"})
    assert client.conversations.retrieve(created.id).model_dump() == created.model_dump()

    updated = client.conversations.update(created.id, metadata={"topic": "other", "k": "v"})
    assert updated.metadata == {"topic": "other", "k": "v"} and updated.created_at == created.created_at
    assert client.conversations.retrieve(created.id).metadata == {"topic": "other", "k": "v"}
    cleared = client.conversations.update(created.id, metadata=None)
    assert cleared.metadata == {}

    raw = client.conversations.with_raw_response.delete(created.id)
    deleted = ConversationDeletedResource.model_validate(raw.http_response.json())
    assert (deleted.id, deleted.object, deleted.deleted) == (created.id, "conversation.deleted", True)
    with pytest.raises(openai.NotFoundError):
        client.conversations.retrieve(created.id)
    with pytest.raises(openai.NotFoundError):
        client.conversations.items.list(created.id)
    with pytest.raises(openai.NotFoundError):
        client.conversations.delete(created.id)

    bare = _conversation(client)
    assert bare.metadata == {}
    assert client.conversations.items.list(bare.id).data == []


def test_items_of_every_kind_round_trip(service: Service) -> None:
    client = service.openai()
    conversation = _conversation(client, items=EVERY_KIND[:3])
    added = _add(client, conversation.id, EVERY_KIND[3:])
    assert [item.type for item in added.data] == [
        "reasoning",
        "function_call",
        "function_call_output",
        "message",
    ]
    assert (added.first_id, added.last_id, added.has_more) == (added.data[0].id, added.data[-1].id, False)

    listed = client.conversations.items.list(conversation.id, order="asc", limit=100)
    assert [item.type for item in listed.data] == ["message"] * 3 + [item.type for item in added.data]
    raw = service.http().get(f"/v1/conversations/{conversation.id}/items", params={"order": "asc"}).json()
    ConversationItemList.model_validate(raw)
    for item in raw["data"]:
        ITEM.validate_python(item)
        fetched = client.conversations.items.retrieve(item["id"], conversation_id=conversation.id)
        assert fetched.id == item["id"] and fetched.type == item["type"]
        one = service.http().get(f"/v1/conversations/{conversation.id}/items/{item['id']}").json()
        assert one == item
    assert raw["data"][0]["content"] == [{"type": "input_text", "text": "Be brief."}]
    assert raw["data"][2]["content"][1]["image_url"] == "https://example.com/a.png"
    assert raw["data"][-1]["content"][0]["text"] == "It is 42."
    # `include` is accepted (nothing it would add is stored).
    client.conversations.items.list(conversation.id, include=["message.output_text.logprobs"])
    client.conversations.items.retrieve(
        raw["data"][0]["id"], conversation_id=conversation.id, include=["reasoning.encrypted_content"]
    )


def test_items_pagination(service: Service) -> None:
    client = service.openai()
    conversation = _conversation(client, items=[{"role": "user", "content": f"m{i}"} for i in range(4)])
    _add(client, conversation.id, [{"role": "user", "content": f"m{i}"} for i in range(4, 7)])
    ids = [item.id for item in client.conversations.items.list(conversation.id, order="asc", limit=100)]
    assert len(ids) == 7
    page = client.conversations.items.list(conversation.id, order="asc", limit=3)
    assert [item.id for item in page.data] == ids[:3] and page.has_more
    # Iterating auto-paginates: the SDK follows has_more and last_id.
    assert [item.id for item in client.conversations.items.list(conversation.id, order="asc", limit=3)] == ids
    assert [item.id for item in client.conversations.items.list(conversation.id, limit=2)] == ids[::-1]

    http = service.http()
    desc = http.get(f"/v1/conversations/{conversation.id}/items", params={"limit": 3}).json()
    ConversationItemList.model_validate(desc)
    assert [item["id"] for item in desc["data"]] == ids[::-1][:3]
    assert (desc["first_id"], desc["last_id"], desc["has_more"]) == (ids[6], ids[4], True)
    last = http.get(f"/v1/conversations/{conversation.id}/items", params={"after": ids[4], "limit": 4}).json()
    assert [item["id"] for item in last["data"]] == ids[3::-1] and last["has_more"] is False
    asc = http.get(
        f"/v1/conversations/{conversation.id}/items", params={"after": ids[1], "order": "asc", "limit": 5}
    ).json()
    assert [item["id"] for item in asc["data"]] == ids[2:] and asc["has_more"] is False


def test_delete_item_returns_the_conversation(service: Service) -> None:
    client = service.openai()
    conversation = _conversation(
        client,
        items=[{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
        metadata={"m": "1"},
    )
    first, second = (str(item.id) for item in client.conversations.items.list(conversation.id, order="asc"))
    raw = client.conversations.items.with_raw_response.delete(first, conversation_id=conversation.id)
    after = Conversation.model_validate(raw.http_response.json())
    assert after.model_dump() == conversation.model_dump()
    assert [item.id for item in client.conversations.items.list(conversation.id)] == [second]
    with pytest.raises(openai.NotFoundError) as missing:
        client.conversations.items.retrieve(first, conversation_id=conversation.id)
    assert (missing.value.code, missing.value.param) == ("not_found", "item_id")
    with pytest.raises(openai.NotFoundError):
        client.conversations.items.delete(first, conversation_id=conversation.id)


@pytest.fixture
def other_tenant(service: Service) -> Iterator[httpx.Client]:
    """The same service, database and backend, called with another tenant's key."""
    other = new_tenant(service.settings.database_url)
    with service.http(other.user_key) as http:
        yield http


def test_another_tenants_conversation_is_not_found(service: Service, other_tenant: httpx.Client) -> None:
    client = service.openai()
    conversation = _conversation(client, items=[{"role": "user", "content": "private"}])
    item_id = client.conversations.items.list(conversation.id).data[0].id
    base = f"/v1/conversations/{conversation.id}"
    requests: list[tuple[str, str, dict[str, Any] | None]] = [
        ("GET", base, None),
        ("POST", base, {"metadata": {}}),
        ("DELETE", base, None),
        ("GET", f"{base}/items", None),
        ("POST", f"{base}/items", {"items": [{"role": "user", "content": "x"}]}),
        ("GET", f"{base}/items/{item_id}", None),
        ("DELETE", f"{base}/items/{item_id}", None),
    ]
    for method, path, body in requests:
        reply = other_tenant.request(method, path, json=body)
        assert reply.status_code == 404, (method, path)
        assert _error(reply)["param"] == "conversation_id"
    # Untouched for its owner.
    assert client.conversations.retrieve(conversation.id).model_dump() == conversation.model_dump()
    assert [item.id for item in client.conversations.items.list(conversation.id)] == [item_id]


def _missing_cases() -> list[tuple[str, str, dict[str, Any] | None, str]]:
    base = "/v1/conversations/conv_missing"
    return [
        ("GET", base, None, "conversation_id"),
        ("POST", base, {"metadata": {"k": "v"}}, "conversation_id"),
        ("DELETE", base, None, "conversation_id"),
        ("GET", f"{base}/items", None, "conversation_id"),
        ("POST", f"{base}/items", {"items": [{"role": "user", "content": "x"}]}, "conversation_id"),
        ("GET", f"{base}/items/msg_missing", None, "conversation_id"),
        ("DELETE", f"{base}/items/msg_missing", None, "conversation_id"),
    ]


@pytest.mark.parametrize(("method", "path", "body", "param"), _missing_cases())
def test_unknown_conversation_is_404(
    service: Service, method: str, path: str, body: dict[str, Any] | None, param: str
) -> None:
    reply = service.http().request(method, path, json=body)
    assert reply.status_code == 404
    error = _error(reply)
    assert (error["type"], error["code"], error["param"]) == ("invalid_request_error", "not_found", param)
    assert "conv_missing" in error["message"]


def test_unknown_item_is_404_through_the_sdk(service: Service) -> None:
    client = service.openai()
    conversation = _conversation(client, items=[{"role": "user", "content": "x"}])
    for call in (client.conversations.items.retrieve, client.conversations.items.delete):
        with pytest.raises(openai.NotFoundError) as missing:
            call("msg_missing", conversation_id=conversation.id)
        assert missing.value.status_code == 404
        assert (missing.value.type, missing.value.code, missing.value.param) == (
            "invalid_request_error",
            "not_found",
            "item_id",
        )
    with pytest.raises(openai.NotFoundError) as unknown:
        client.conversations.retrieve("conv_missing")
    assert (unknown.value.code, unknown.value.param) == ("not_found", "conversation_id")


def _user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


@pytest.mark.parametrize(
    ("method", "suffix", "body", "params", "param", "code"),
    [
        ("POST", "", {"items": [_user("x")] * 21}, None, "items", "invalid_value"),
        ("POST", "", {"items": "hello"}, None, "items", "invalid_value"),
        ("POST", "", {"metadata": {f"k{i}": "v" for i in range(17)}}, None, "metadata", "invalid_value"),
        ("POST", "", {"metadata": {"k" * 65: "v"}}, None, "metadata", "invalid_value"),
        ("POST", "", {"metadata": {"k": "v" * 513}}, None, "metadata", "invalid_value"),
        ("POST", "", {"metadata": {"k": 1}}, None, "metadata.k", "invalid_value"),
        ("POST", "", {"bogus": 1}, None, "bogus", "unknown_parameter"),
        ("POST", "", {"items": [{"role": "robot", "content": "x"}]}, None, "items[0].role", None),
        ("POST", "", {"items": [_user("x"), {"type": "bogus"}]}, None, "items[1].type", None),
        ("POST", "", {"items": [{"role": "user", "content": []}]}, None, "items[0].content", None),
        ("POST", "/{id}", {}, None, "metadata", "invalid_value"),
        ("POST", "/{id}", {"metadata": {f"k{i}": "v" for i in range(17)}}, None, "metadata", "invalid_value"),
        ("POST", "/{id}/items", {}, None, "items", "invalid_value"),
        ("POST", "/{id}/items", {"items": []}, None, "items", "invalid_value"),
        ("POST", "/{id}/items", {"items": [_user("x")] * 21}, None, "items", "invalid_value"),
        ("POST", "/{id}/items", {"items": [{"type": "function_call"}]}, None, "items[0].call_id", None),
        ("POST", "/{id}/items", {"items": [_user("x")]}, {"include": "nope"}, "include", "invalid_value"),
        ("GET", "/{id}/items", None, {"limit": 0}, "limit", "integer_below_min_value"),
        ("GET", "/{id}/items", None, {"limit": 101}, "limit", "integer_above_max_value"),
        ("GET", "/{id}/items", None, {"order": "sideways"}, "order", "invalid_value"),
        ("GET", "/{id}/items", None, {"include[]": "nope"}, "include[]", "invalid_value"),
        ("GET", "/{id}/items", None, {"bogus": "1"}, "bogus", "unknown_parameter"),
    ],
)
def test_bad_requests_name_the_field(
    service: Service,
    method: str,
    suffix: str,
    body: dict[str, Any] | None,
    params: dict[str, Any] | None,
    param: str,
    code: str | None,
) -> None:
    conversation = _conversation(service.openai())
    path = "/v1/conversations" + suffix.replace("{id}", conversation.id)
    reply = service.http().request(method, path, json=body, params=params)
    assert reply.status_code == 400, reply.text
    error = _error(reply)
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", param, code)
    # Nothing was written by a rejected request.
    assert service.openai().conversations.items.list(conversation.id).data == []


def test_sdk_raises_bad_request_with_the_envelope(service: Service) -> None:
    client = service.openai()
    robot: Any = [{"role": "robot", "content": "x"}]  # not a valid item: the SDK's types say so too
    with pytest.raises(openai.BadRequestError) as bad:
        client.conversations.create(items=robot)
    assert bad.value.status_code == 400
    assert (bad.value.type, bad.value.param) == ("invalid_request_error", "items[0].role")
    conversation = _conversation(client)
    with pytest.raises(openai.BadRequestError) as empty:
        client.conversations.items.create(conversation.id, items=[])
    assert (empty.value.code, empty.value.param) == ("invalid_value", "items")
