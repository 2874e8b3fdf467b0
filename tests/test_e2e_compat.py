"""What SDK users do first, answered as OpenAI answers it: every field of the official SDK's
`ResponseCreateParams` is accepted or refused on purpose, unknown fields and numbers out of range get
OpenAI's codes, malformed ids are 400, and the compatibility table in docs/api.md says what the tests do."""

from __future__ import annotations

import re
import typing
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai.types.responses import response_create_params
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect
from websockets.typing import Origin

from service.api.schemas import UNSUPPORTED_FIELDS
from tests.conftest import Service

MODEL = "ref-chatml"
LOOKUP = {
    "type": "function",
    "name": "lookup",
    "parameters": {"type": "object", "properties": {"word": {"type": "string"}}, "required": ["word"]},
}
# One valid value (by the SDK's own types) for every field of ResponseCreateParams. A field the SDK adds
# fails test_every_sdk_field_is_covered until it is given a value here and a decision: accepted, or in
# UNSUPPORTED_FIELDS (400 `unsupported_parameter`, listed in docs/api.md).
SDK_VALUES: dict[str, Any] = {
    "access_programs": {"cyber": "standard"},
    "background": True,
    "background_options": {"completion_window": "soonest"},
    "context_management": [{"type": "compaction", "compact_threshold": 1000}],
    "conversation": None,  # a fresh conversation, made by the test
    "image": {"context_compression": "auto"},
    "include": ["message.output_text.logprobs"],
    "input": "hello",
    "instructions": "Be brief.",
    "max_output_tokens": 32,
    "max_tool_calls": 2,
    "metadata": {"k": "v"},
    "model": MODEL,
    "moderation": {"model": "omni-moderation-latest"},
    "parallel_tool_calls": False,
    "previous_response_id": None,  # a fresh response, made by the test
    "prompt": {"id": "pmpt_123"},
    "prompt_cache_key": "key-1",
    "prompt_cache_options": {"comparison_response_id": "resp_1"},
    "prompt_cache_retention": "24h",
    "reasoning": {"effort": "low", "summary": "auto"},
    "safety_identifier": "user-1",
    "service_tier": "auto",
    "store": False,
    "stream": True,
    "stream_options": {"include_obfuscation": False},
    "temperature": 0.5,
    "text": {"format": {"type": "text"}, "verbosity": "low"},
    "tool_choice": "auto",
    "tools": [LOOKUP],
    "top_logprobs": 2,
    "top_p": 0.5,
    "truncation": "auto",
    "user": "user-1",
}
# Fields only valid beside another one.
COMPANIONS: dict[str, dict[str, Any]] = {"stream_options": {"stream": True}}


def _sdk_fields() -> set[str]:
    return set(typing.get_type_hints(response_create_params.ResponseCreateParamsStreaming)) | set(
        typing.get_type_hints(response_create_params.ResponseCreateParamsNonStreaming)
    )


def test_every_sdk_field_is_covered() -> None:
    assert _sdk_fields() == set(SDK_VALUES)


@pytest.mark.parametrize("field", sorted(SDK_VALUES))
def test_sdk_create_params_walk(service: Service, field: str) -> None:
    client = service.openai()
    value = SDK_VALUES[field]
    if field == "conversation":
        value = client.conversations.create().id
    elif field == "previous_response_id":
        value = client.responses.create(model=MODEL, input="first").id
    params: dict[str, Any] = {"model": MODEL, "input": "hello", **COMPANIONS.get(field, {}), field: value}
    if field in UNSUPPORTED_FIELDS:
        with pytest.raises(openai.BadRequestError) as raised:
            client.responses.create(**params)
        assert (raised.value.code, raised.value.param) == ("unsupported_parameter", field)
        return
    created = client.responses.create(**params)
    if params.get("stream"):
        events = list(created)
        assert events[-1].type == "response.completed", events[-1]
    else:
        assert created.status in ("completed", "queued"), created


def test_unknown_fields_name_themselves(service: Service) -> None:
    client = service.openai()
    with pytest.raises(openai.BadRequestError) as raised:
        client.responses.create(model=MODEL, input="x", extra_body={"temprature": 0.5})
    assert (raised.value.code, raised.value.param) == ("unknown_parameter", "temprature")
    assert isinstance(raised.value.body, dict)
    assert raised.value.body["message"] == "Unknown parameter: 'temprature'."


def test_penalties_are_accepted_and_echoed(service: Service) -> None:
    # The SDK's create() has no penalty arguments (its Response type no penalty fields): extra_body.
    client = service.openai()
    raw = client.responses.with_raw_response.create(
        model=MODEL, input="x", extra_body={"presence_penalty": 0.5, "frequency_penalty": -1.0}
    )
    created = raw.http_response.json()
    assert (created["presence_penalty"], created["frequency_penalty"]) == (0.5, -1.0)
    plain = service.http().post("/v1/responses", json={"model": MODEL, "input": "x"}).json()
    assert (plain["presence_penalty"], plain["frequency_penalty"]) == (0.0, 0.0)


def test_echoed_tools_keep_strict(service: Service) -> None:
    http = service.http()
    unset = http.post("/v1/responses", json={"model": MODEL, "input": "x", "tools": [LOOKUP]}).json()
    assert unset["tools"][0]["strict"] is None and unset["tools"][0]["description"] is None
    strict = http.post(
        "/v1/responses", json={"model": MODEL, "input": "x", "tools": [{**LOOKUP, "strict": True}]}
    ).json()
    assert strict["tools"][0]["strict"] is True


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({"max_output_tokens": 15}, "max_output_tokens", "integer_below_min_value"),
        ({"max_output_tokens": 2**31}, "max_output_tokens", "integer_above_max_value"),
        ({"temperature": 2.5}, "temperature", "decimal_above_max_value"),
        ({"frequency_penalty": -2.5}, "frequency_penalty", "decimal_below_min_value"),
        ({"tool_choice": "sometimes"}, "tool_choice", "invalid_value"),
        ({"tool_choice": {"type": "function"}}, "tool_choice.name", "invalid_value"),
        ({"tools": [{**LOOKUP, "strict": [True]}]}, "tools[0].strict", "invalid_value"),
        ({"conversation": "not-a-conversation"}, "conversation", "invalid_value"),
        ({"conversation": {"id": "x"}}, "conversation.id", "invalid_value"),
    ],
)
def test_openai_codes_and_plain_params(service: Service, body: dict[str, Any], param: str, code: str) -> None:
    reply = service.http().post("/v1/responses", json={"model": MODEL, "input": "x", **body})
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert (error["param"], error["code"]) == (param, code), error
    # No internal labels of the validator in what the client reads.
    assert not re.search(r"literal\[|function-|constrained-|Named|\bstr\b", error["param"])


def test_max_output_tokens_minimum_message(service: Service) -> None:
    reply = service.http().post("/v1/responses", json={"model": MODEL, "input": "x", "max_output_tokens": 1})
    assert reply.json()["error"]["message"] == (
        "Invalid 'max_output_tokens': integer below min value. Expected a value >= 16, but got 1 instead."
    )


@pytest.mark.parametrize("path", ["/v1/conversations/bogus", "/v1/conversations/bogus/items"])
def test_a_malformed_conversation_id_is_400(service: Service, path: str) -> None:
    reply = service.http().get(path)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert (error["param"], error["code"]) == ("conversation_id", "invalid_value")
    # A well-formed id that does not exist is still 404.
    assert service.http().get("/v1/conversations/conv_0123abcd").status_code == 404


def test_a_backend_client_error_has_a_string_code_or_none(
    service: Service, backend_admin: httpx.Client
) -> None:
    backend_admin.post("/admin/fail", json={"count": 1, "status": 400}).raise_for_status()
    reply = service.http().post("/v1/responses", json={"model": MODEL, "input": "x"})
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["code"] is None


def _field_table() -> dict[str, str]:
    """docs/api.md's table of request fields: each field named in a row's first cell -> its status."""
    text = (Path(__file__).parents[1] / "docs" / "api.md").read_text()
    section = text.split("### Request fields of `POST /v1/responses`", 1)[1].split("\n#", 1)[0]
    rows = {}
    for line in section.splitlines()[4:]:
        if line.startswith("|"):
            names, status = (cell.strip() for cell in line.strip("|").split("|")[:2])
            rows.update(dict.fromkeys(re.findall(r"`(\w+)`", names), status))
    return rows


def test_the_compatibility_table_matches() -> None:
    table = _field_table()
    assert set(table) == set(SDK_VALUES) | {"presence_penalty", "frequency_penalty"}
    for field, status in table.items():
        assert status == ("not supported" if field in UNSUPPORTED_FIELDS else "supported"), field


def _socket_status(service: Service, origin: str | None) -> int:
    """101 if the upgrade is accepted, else the HTTP status it was answered with."""
    url = service.url.replace("http://", "ws://") + "/v1/responses"
    try:
        with connect(
            url,
            origin=Origin(origin) if origin else None,
            additional_headers={"authorization": f"Bearer {service.api_key}"},
        ):
            return 101
    except InvalidStatus as refused:
        return refused.response.status_code


def test_websocket_origins(service: Service, service_factory: Any) -> None:
    same_host = service.url
    assert _socket_status(service, None) == 101  # an SDK or a server: no Origin
    assert _socket_status(service, same_host) == 101
    assert _socket_status(service, "http://elsewhere.example") == 403
    listed: Service = service_factory("postgres", websocket_allowed_origins="https://app.example")
    assert _socket_status(listed, "https://app.example") == 101
    assert _socket_status(listed, listed.url) == 403


def test_streaming_a_stored_response_is_refused_not_silent(service: Service) -> None:
    client = service.openai()
    created = client.responses.create(model=MODEL, input="x")
    with pytest.raises(openai.BadRequestError) as raised:
        list(client.responses.retrieve(created.id, stream=True))
    assert (raised.value.code, raised.value.param) == ("unsupported_value", "stream")
    assert client.responses.retrieve(created.id).id == created.id


def _statements(reply: httpx.Response) -> int:
    match = re.search(r'db;dur=[0-9.]+;desc="(\d+) statements', reply.headers["server-timing"])
    assert match, reply.headers["server-timing"]
    return int(match.group(1))


@pytest.mark.parametrize("dialect", ["postgres", "sqlite"])
def test_input_items_list_the_history_used(service_factory: Any, dialect: str) -> None:
    service: Service = service_factory(dialect)
    http = service.http()
    first = http.post("/v1/responses", json={"model": MODEL, "input": "one"}).json()
    second = http.post(
        "/v1/responses",
        json={
            "model": MODEL,
            "input": [{"role": "user", "content": "two"}],
            "previous_response_id": first["id"],
        },
    ).json()
    listed = http.get(f"/v1/responses/{second['id']}/input_items", params={"order": "asc"}).json()
    ids = [item["id"] for item in listed["data"]]
    stored_first = http.get(f"/v1/responses/{first['id']}/input_items").json()["data"]
    assert ids[:1] == [stored_first[0]["id"]]
    assert ids[1:] == [first["output"][0]["id"], ids[2]] and listed["data"][2]["content"][0]["text"] == "two"
    # The SDK pages through it, newest first by default, following `after`.
    client = service.openai()
    assert [item.id for item in client.responses.input_items.list(second["id"], limit=1)] == ids[::-1]
    page = http.get(f"/v1/responses/{second['id']}/input_items", params={"limit": 1, "after": ids[1]}).json()
    assert [item["id"] for item in page["data"]] == ids[:1] and page["has_more"] is False


def test_input_items_cost_does_not_grow_with_depth(service: Service) -> None:
    http = service.http()
    previous = None
    costs = {}
    for depth in range(1, 201):
        body: dict[str, Any] = {"model": MODEL, "input": f"turn {depth}", "max_output_tokens": 16}
        if previous:
            body["previous_response_id"] = previous
        previous = http.post("/v1/responses", json=body).json()["id"]
        if depth in (2, 200):
            page = http.get(f"/v1/responses/{previous}/input_items", params={"limit": 5})
            assert len(page.json()["data"]) == 3 if depth == 2 else page.json()["has_more"]
            costs[depth] = _statements(page)
    assert costs[2] == costs[200] == 1, costs


def _ids(http: httpx.Client, response_id: str, **params: Any) -> list[str]:
    page = http.get(f"/v1/responses/{response_id}/input_items", params={"order": "asc", **params})
    assert page.status_code == 200, page.text
    return [item["id"] for item in page.json()["data"]]


@pytest.mark.parametrize("dialect", ["postgres", "sqlite"])
def test_input_items_of_a_conversation_turn_list_the_conversation_before_it(
    service_factory: Any, dialect: str
) -> None:
    service: Service = service_factory(dialect)
    http = service.http()
    start = {"type": "message", "role": "user", "content": "zero"}
    conversation = http.post("/v1/conversations", json={"items": [start]}).json()["id"]
    first = http.post("/v1/responses", json={"model": MODEL, "input": "one", "conversation": conversation})
    added = http.post(
        f"/v1/conversations/{conversation}/items", json={"items": [{"role": "user", "content": "aside"}]}
    ).json()["data"][0]["id"]
    second = http.post("/v1/responses", json={"model": MODEL, "input": "two", "conversation": conversation})
    before = [
        item["id"] for item in http.get(f"/v1/conversations/{conversation}/items?order=asc").json()["data"]
    ]
    assert len(before) == 6  # zero, one, first's output, aside, two, second's output
    # Items added after a turn are not part of what generated it.
    http.post(
        f"/v1/conversations/{conversation}/items", json={"items": [{"role": "user", "content": "later"}]}
    )
    assert _ids(http, first.json()["id"]) == before[:2]
    assert _ids(http, second.json()["id"]) == before[:5] and before[3] == added
    # Paged across the conversation's part and the turn's own input, in either order.
    assert _ids(http, second.json()["id"], after=before[3]) == before[4:5]
    assert _ids(http, second.json()["id"], limit=2, after=before[1]) == before[2:4]
    newest = http.get(f"/v1/responses/{second.json()['id']}/input_items", params={"after": before[4]}).json()
    assert [item["id"] for item in newest["data"]] == before[3::-1] and not newest["has_more"]


def test_input_items_of_a_conversation_turn_cost_one_statement_whatever_its_length(service: Service) -> None:
    http = service.http()
    costs = {}
    for length in (2, 200):
        conversation = http.post("/v1/conversations").json()["id"]
        for batch in range(0, length, 20):
            items = [{"role": "user", "content": f"item {n}"} for n in range(batch, min(batch + 20, length))]
            http.post(f"/v1/conversations/{conversation}/items", json={"items": items}).raise_for_status()
        turn = http.post("/v1/responses", json={"model": MODEL, "input": "now", "conversation": conversation})
        page = http.get(
            f"/v1/responses/{turn.json()['id']}/input_items", params={"limit": 5}
        ).raise_for_status()
        assert len(page.json()["data"]) == min(length + 1, 5) and page.json()["has_more"] is (length == 200)
        costs[length] = _statements(page)
    assert costs[2] == costs[200] == 1, costs
