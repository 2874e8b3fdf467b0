"""Named prefixes over real HTTP: POST /v1/prefixes warms the backend up with a long shared start, and the
first request that names it (a Responses turn or a chat completion) finds its tokens in the backend's
prefix cache; conflicting or unknown prefixes are 400s before any backend call; prefixes are a tenant's
own, listed, read and deleted."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import Service, new_tenant

MODEL = "ref-chatml"


def long_instructions() -> str:
    """Well over a few KV blocks of the reference backend (16 tokens each), and seen nowhere before."""
    return f"Rules {uuid.uuid4().hex}. " + " ".join(
        f"Rule {n}: answer with care and cite rule {n}." for n in range(30)
    )


def register(service: Service, name: str, **fields: Any) -> httpx.Response:
    with service.http() as http:
        return http.post("/v1/prefixes", json={"name": name, "model": MODEL, **fields})


def test_the_first_turn_starts_on_a_cache_hit(service: Service) -> None:
    name = f"p-{uuid.uuid4().hex[:8]}"
    instructions = long_instructions()
    shared: list[Any] = [{"role": "user", "content": "Context: the shared document."}]
    registered = register(service, name, instructions=instructions, input=shared)
    assert registered.status_code == 200, registered.text
    assert registered.json()["object"] == "convstate.prefix" and registered.json()["prompt_tokens"] > 200

    client = service.openai()
    first = client.responses.create(
        model=MODEL, input="First question?", extra_body={"convstate_prefix": name}, temperature=0
    )
    assert first.usage is not None and first.usage.input_tokens_details.cached_tokens > 200
    assert first.instructions == instructions
    with service.http() as http:
        items = http.get(f"/v1/responses/{first.id}/input_items", params={"order": "asc"}).json()["data"]
    assert [item["content"][0]["text"] for item in items] == [
        "Context: the shared document.",
        "First question?",
    ]
    # The same start, not registered: nothing of it is in the backend's cache yet.
    cold = client.responses.create(
        model=MODEL,
        input=[*shared, {"role": "user", "content": "First question?"}],
        instructions=long_instructions(),
    )
    assert cold.usage is not None and cold.usage.input_tokens_details.cached_tokens == 0
    # A turn that starts from a prefix continues like any other.
    second = client.responses.create(model=MODEL, input="And then?", previous_response_id=first.id)
    assert second.status == "completed"


def test_a_chat_completion_starts_from_a_prefix(service: Service) -> None:
    name = f"p-{uuid.uuid4().hex[:8]}"
    tools = [{"type": "function", "name": "lookup", "parameters": {"type": "object", "properties": {}}}]
    assert register(service, name, instructions=long_instructions(), tools=tools).status_code == 200
    reply = service.openai().chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Hello"}],
        max_tokens=16,
        extra_body={"convstate_prefix": name},
    )
    details = reply.usage.prompt_tokens_details if reply.usage else None
    assert details is not None and (details.cached_tokens or 0) > 200


@pytest.mark.parametrize(
    ("route", "body", "param", "code"),
    [
        ("/v1/responses", {"input": "x", "convstate_prefix": "nope"}, "convstate_prefix", "prefix_not_found"),
        ("/v1/responses", {"input": "x", "instructions": "Other."}, "instructions", "prefix_conflict"),
        ("/v1/responses", {"input": "x", "model": "ref-system-once"}, "model", "prefix_conflict"),
        (
            "/v1/responses",
            {"input": "x", "previous_response_id": "resp_1"},
            "convstate_prefix",
            "mutually_exclusive_parameters",
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "x"}], "convstate_prefix": 3},
            "convstate_prefix",
            "invalid_value",
        ),
        ("/v1/completions", {"prompt": "x"}, "convstate_prefix", "invalid_value"),
    ],
)
def test_bad_prefix_use_is_a_400_before_the_backend(
    service: Service, backend_admin: httpx.Client, route: str, body: dict[str, Any], param: str, code: str
) -> None:
    name = f"p-{uuid.uuid4().hex[:8]}"
    assert register(service, name, instructions="Be brief.").status_code == 200
    before = backend_admin.get("/stats").json()["requests"]
    with service.http() as http:
        refused = http.post(route, json={"model": MODEL, "convstate_prefix": name, **body})
    assert refused.status_code == 400, refused.text
    assert (refused.json()["error"]["param"], refused.json()["error"]["code"]) == (param, code)
    assert backend_admin.get("/stats").json()["requests"] == before


def test_prefixes_are_a_tenants_own_and_can_be_listed_read_and_deleted(service: Service) -> None:
    name = f"p-{uuid.uuid4().hex[:8]}"
    assert register(service, name, instructions="Be brief.", input="Hi").status_code == 200
    other = new_tenant(service.settings.database_url)
    with pytest.raises(openai.BadRequestError) as unknown:
        service.openai(other.user_key).responses.create(
            model=MODEL, input="x", extra_body={"convstate_prefix": name}
        )
    assert unknown.value.code == "prefix_not_found"
    with service.http() as http:
        assert name in [p["id"] for p in http.get("/v1/prefixes").json()["data"]]
        assert http.get(f"/v1/prefixes/{name}").json()["input"] == [{"role": "user", "content": "Hi"}]
        assert http.delete(f"/v1/prefixes/{name}").json() == {
            "id": name,
            "object": "convstate.prefix.deleted",
            "deleted": True,
        }
        assert http.get(f"/v1/prefixes/{name}").status_code == 404
    with service.http() as http:
        for body in ({"input": [{"type": "bogus"}]}, {}):
            bad = http.post("/v1/prefixes", json={"name": "x", "model": MODEL, **body})
            assert bad.status_code == 400, body
