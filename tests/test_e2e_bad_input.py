"""Input no serializer or database downstream accepts gets a 400 in OpenAI's envelope, naming the field,
before any backend call: NUL characters, lone surrogates, integers beyond 64 bits, JSON nested too deep,
malformed items. Bodies over the size limit get 413, however they are framed."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import orjson
import pytest

from service.api.body import MAX_DEPTH
from tests.conftest import Service

MODEL = "ref-chatml"


def _error(reply: httpx.Response) -> dict[str, Any]:
    body = reply.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    error: dict[str, Any] = body["error"]
    return error


def _backend_requests(backend_admin: httpx.Client) -> int:
    count: int = backend_admin.get("/stats").json()["requests"]
    return count


def _nested(depth: int) -> str:
    """A body whose tool parameters are a JSON schema `depth` objects deep. As text: the client's own
    encoder stops at about a thousand levels."""
    schema = '{"items": ' * (depth - 1) + '{"type": "string"}' + "}" * (depth - 1)
    tool = '{"type": "function", "name": "f", "parameters": ' + schema + "}"
    return '{"model": "ref-chatml", "input": "x", "tools": [' + tool + "]}"


def _tool(parameters: dict[str, Any]) -> dict[str, Any]:
    return {"type": "function", "name": "f", "parameters": parameters}


def _compaction(payload: object) -> dict[str, Any]:
    return {"type": "compaction", "encrypted_content": base64.b64encode(orjson.dumps(payload)).decode()}


# (raw JSON body of POST /v1/responses, the param the 400 must name)
RAW_BODIES = [
    (b'{"model": "ref-chatml", "input": "a\\u0000b"}', "input"),
    (
        b'{"model": "ref-chatml", "input": [{"role": "user", "content": [{"type": "input_text", '
        b'"text": "\\u0000"}]}]}',
        "input[0].content[0].text",
    ),
    (b'{"model": "ref-chatml", "input": "x", "metadata": {"k\\u0000": "v"}}', "metadata"),
    (b'{"model": "ref-chatml\\u0000", "input": "x"}', "model"),
    (b'{"model": "ref-chatml", "input": "\\ud800"}', "input"),
    (b'{"model": "ref-chatml", "input": "x", "instructions": "ok \\udfff then"}', "instructions"),
    (b'{"model": "ref-chatml", "input": "x", "metadata": {"\\ud83d": "v"}}', "metadata"),
    (
        b'{"model": "ref-chatml", "input": "x", "tools": [{"type": "function", "name": "f", '
        b'"parameters": {"default": NaN}}]}',
        "tools[0].parameters.default",
    ),
    (b'{"model": "ref-chatml", "input": "x", "temperature": Infinity}', "temperature"),
]


@pytest.mark.parametrize(("body", "param"), RAW_BODIES)
def test_nul_and_lone_surrogates_are_rejected(
    service: Service, backend_admin: httpx.Client, body: bytes, param: str
) -> None:
    before = _backend_requests(backend_admin)
    reply = service.http().post("/v1/responses", content=body, headers={"content-type": "application/json"})
    assert reply.status_code == 400, reply.text
    error = _error(reply)
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", param, "invalid_value")
    assert _backend_requests(backend_admin) == before


# (fields of POST /v1/responses besides model, the param the 400 must name)
BAD_FIELDS: list[tuple[dict[str, Any], str]] = [
    ({"input": "x", "max_output_tokens": 2**70}, "max_output_tokens"),
    ({"input": "x", "max_output_tokens": 2**63}, "max_output_tokens"),
    ({"input": "x", "max_tool_calls": 2**64}, "max_tool_calls"),
    ({"input": "x", "tools": [_tool({"type": "integer", "default": 2**80})]}, "tools[0].parameters.default"),
    ({"input": "x", "tools": [_tool({"properties": {"a\x00": {}}})]}, "tools[0].parameters.properties"),
    ({"input": [_compaction({"v": 1, "summary": 42})]}, "input[0].encrypted_content"),
    ({"input": [_compaction({"v": 1, "summary": {"text": "x"}})]}, "input[0].encrypted_content"),
    ({"input": [_compaction(["summary"])]}, "input[0].encrypted_content"),
    ({"input": [{"type": {"nested": "type"}}]}, "input[0].type"),
    (
        {"input": [{"type": "reasoning", "summary": [{"type": "summary_text", "text": 1}]}]},
        "input[0].summary[0].text",
    ),
    ({"input": [{"type": "reasoning", "content": ["thinking"]}]}, "input[0].content[0]"),
    (
        {
            "input": [
                {
                    "role": "user",
                    "content": [
                        {"type": "input_image", "image_url": "data:image/png;base64,AA==", "detail": ["x"]}
                    ],
                }
            ]
        },
        "input[0].content[0].detail",
    ),
]


@pytest.mark.parametrize(("fields", "param"), BAD_FIELDS, ids=[param for _, param in BAD_FIELDS])
def test_out_of_range_deep_and_malformed_values_are_rejected(
    service: Service, backend_admin: httpx.Client, fields: dict[str, Any], param: str
) -> None:
    before = _backend_requests(backend_admin)
    reply = service.http().post("/v1/responses", json={"model": MODEL, **fields})
    assert reply.status_code == 400, reply.text
    error = _error(reply)
    assert (error["type"], error["param"]) == ("invalid_request_error", param)
    assert _backend_requests(backend_admin) == before


def test_nesting_is_bounded(service: Service, backend_admin: httpx.Client) -> None:
    http = service.http()
    headers = {"content-type": "application/json"}
    # The body is level 1, `tools` 2, the tool 3, its parameters 4.
    fits = http.post("/v1/responses", content=_nested(MAX_DEPTH - 3), headers=headers)
    assert fits.status_code == 200, fits.text
    before = _backend_requests(backend_admin)
    for depth in (MAX_DEPTH - 2, 300):
        reply = http.post("/v1/responses", content=_nested(depth), headers=headers)
        assert reply.status_code == 400, reply.text[:200]
        error = _error(reply)
        assert error["param"] == "tools[0].parameters" + ".items" * (MAX_DEPTH - 3), depth
        assert error["code"] == "invalid_value"
    # Too deep for the JSON parser itself: a parse error.
    reply = http.post("/v1/responses", content=_nested(100_000), headers=headers)
    assert reply.status_code == 400 and _error(reply)["type"] == "invalid_request_error"
    assert _backend_requests(backend_admin) == before


def test_a_turn_without_a_json_body_is_refused(service: Service, backend_admin: httpx.Client) -> None:
    """No body, or one that does not say it is JSON: a 400 saying what to send, never a backend call. A
    body that is there is refused before the key is checked, as a malformed one is; a missing one only
    after (a caller without a key learns that first)."""
    before = _backend_requests(backend_admin)
    turn = b'{"model": "ref-chatml", "input": "x"}'
    plain = service.http().post("/v1/responses", content=turn, headers={"content-type": "text/plain"})
    assert plain.status_code == 400, plain.text
    assert "Content-Type: application/json" in _error(plain)["message"]
    empty = service.http().post("/v1/responses")
    assert empty.status_code == 400, empty.text
    assert _error(empty)["message"] == "The request has no body; send a JSON object."
    with httpx.Client(base_url=service.url) as anonymous:
        assert anonymous.post("/v1/responses").status_code == 401
        refused = anonymous.post("/v1/responses", content=turn, headers={"content-type": "text/plain"})
        assert refused.status_code == 400
    # The JSON media types FastAPI accepts: with parameters, and any application/*+json.
    for media in ("application/json; charset=utf-8", "application/merge-patch+json"):
        accepted = service.http().post("/v1/responses", content=turn, headers={"content-type": media})
        assert accepted.status_code == 200, (media, accepted.text)
    assert _backend_requests(backend_admin) == before + 2


def test_bytes_that_are_not_utf8_are_a_parse_error(service: Service) -> None:
    # A surrogate encoded as if it were a character: not UTF-8.
    body = b'{"model": "ref-chatml", "input": "\xed\xa0\x80"}'
    reply = service.http().post("/v1/responses", content=body, headers={"content-type": "application/json"})
    assert reply.status_code == 400 and _error(reply)["type"] == "invalid_request_error"


def test_values_at_the_limits_are_accepted(service: Service) -> None:
    schema = {"type": "integer", "minimum": -(2**63), "maximum": 2**63 - 1, "description": "\U0001f600 ok"}
    reply = service.http().post(
        "/v1/responses",
        json={"model": MODEL, "input": "x", "tools": [_tool(schema)]},
    )
    assert reply.status_code == 200, reply.text
    assert reply.json()["tools"][0]["parameters"] == schema


def test_the_sdk_sees_a_bad_request_naming_the_field(service: Service) -> None:
    client = service.openai()
    with pytest.raises(openai.BadRequestError) as raised:
        client.responses.create(model=MODEL, input="before\x00after")
    assert raised.value.status_code == 400 and raised.value.param == "input"
    with pytest.raises(openai.BadRequestError) as raised:
        client.responses.create(model=MODEL, input="x", max_output_tokens=2**64)
    assert raised.value.param == "max_output_tokens"


@pytest.mark.parametrize(
    ("method", "path", "param"),
    [
        ("GET", "/v1/responses/resp_%00", "response_id"),
        ("DELETE", "/v1/responses/resp_%00", "response_id"),
        ("POST", "/v1/responses/resp_%00/cancel", "response_id"),
        ("GET", "/v1/responses/resp_x/input_items?after=%00", "after"),
        ("GET", "/v1/conversations/conv_%00", "conversation_id"),
        ("GET", "/v1/conversations/conv_x/items/msg_%00", "item_id"),
        ("GET", "/v1/conversations/conv_x/items?after=msg_%00", "after"),
    ],
)
def test_nul_in_a_path_segment_or_query_is_rejected(
    service: Service, method: str, path: str, param: str
) -> None:
    reply = service.http().request(method, path)
    assert reply.status_code == 400, reply.text
    assert _error(reply)["param"] == param


def test_conversation_items_are_checked_too(service: Service) -> None:
    http = service.http()
    reply = http.post("/v1/conversations", json={"items": [{"role": "user", "content": "a\x00"}]})
    assert reply.status_code == 400 and _error(reply)["param"] == "items[0].content"
    created = http.post("/v1/conversations", json={}).json()
    reply = http.post(
        f"/v1/conversations/{created['id']}/items",
        json={"items": [_compaction({"v": 1, "summary": None})]},
    )
    assert reply.status_code == 400 and _error(reply)["param"] == "items[0].encrypted_content"


def test_websocket_frames_are_checked_too(service: Service) -> None:
    client = service.openai()
    with client.responses.connect() as connection:
        connection.send({"type": "response.create", "model": MODEL, "input": "bad \x00 frame"})
        error = next(iter(connection))
        assert error.type == "error" and error.status == 400 and error.error.param == "input"
        connection.send({"type": "response.create", "model": MODEL, "input": "fine"})
        for event in connection:
            if event.type in ("response.completed", "response.failed", "error"):
                break
        assert event.type == "response.completed"


def _chunks(total: int, size: int = 1024) -> Iterator[bytes]:
    """A JSON body sent chunked (no content-length): the size limit must count the bytes as they come."""
    yield b'{"model": "ref-chatml", "input": "'
    for _ in range(total // size):
        yield b"x" * size
    yield b'"}'


def test_chunked_body_over_the_limit_gets_413(service_factory: Any, backend_admin: httpx.Client) -> None:
    small: Service = service_factory("postgres", max_request_bytes=2048, max_input_items=3)
    before = _backend_requests(backend_admin)
    reply = small.http().post(
        "/v1/responses", content=_chunks(64 * 1024), headers={"content-type": "application/json"}
    )
    assert reply.status_code == 413, reply.text
    assert _error(reply)["code"] == "request_too_large"
    assert _backend_requests(backend_admin) == before
    fits = small.http().post(
        "/v1/responses", content=_chunks(1024), headers={"content-type": "application/json"}
    )
    assert fits.status_code == 200, fits.text


def test_an_unexpected_error_is_a_500_without_its_text_and_logged_with_the_request_id(
    service: Service, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The last resort, on the turn's direct route and on a route FastAPI dispatches: OpenAI's envelope,
    nothing of the exception, the request's id in the reply and in the logged traceback."""
    secret = "postgresql://internal:5432 exploded"

    async def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError(secret)

    monkeypatch.setattr(service.app.state.pipeline, "create", broken)
    monkeypatch.setattr(service.app.state.conversations, "create", broken)
    http = service.http()
    for path, body in (("/v1/responses", {"model": MODEL, "input": "x"}), ("/v1/conversations", {})):
        caplog.clear()
        reply = http.post(path, json=body, headers={"x-request-id": f"req-broken{len(path)}"})
        assert reply.status_code == 500, path
        assert _error(reply) == {
            "message": "The server had an error while processing your request.",
            "type": "server_error",
            "param": None,
            "code": None,
        }
        assert secret not in reply.text
        assert reply.headers["x-request-id"] == f"req-broken{len(path)}"
        # (The server may log the exception too, on a route FastAPI dispatches; that line is its own.)
        logged = [record for record in caplog.records if record.name == "convstate.api" and record.exc_info]
        assert [getattr(record, "request_id", None) for record in logged] == [f"req-broken{len(path)}"], path
