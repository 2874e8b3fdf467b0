"""Every response object and streaming event this service emits, checked against the published Open
Responses specification (tests/data/open-responses-2026-04-24.schema.json, where it came from is in its
`$comment`), over real HTTP and WebSocket for a representative set of turns: text, tools, reasoning,
images, failures, incomplete, streamed, background, WebSocket and compaction."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from jsonschema import Draft202012Validator
from websockets.sync.client import connect

from tests.conftest import Service
from tests.sse import sse_events

MODEL = "ref-chatml"
SCHEMA = json.loads((Path(__file__).parent / "data" / "open-responses-2026-04-24.schema.json").read_text())
# Event names where OpenAI and the specification differ: this service sends OpenAI's (its SDKs type the
# events by name), the specification's shape otherwise (docs/api.md, compatibility).
SPEC_EVENT_NAMES = {
    "response.reasoning_text.delta": "response.reasoning.delta",
    "response.reasoning_text.done": "response.reasoning.done",
}
LOOKUP = {
    "type": "function",
    "name": "lookup",
    "parameters": {"type": "object", "properties": {"word": {"type": "string"}}, "required": ["word"]},
}
TERMINAL = ("response.completed", "response.incomplete", "response.failed")


def conform(definition: str, value: Any) -> None:
    """Fail naming every place `value` breaks the specification's `definition`."""
    validator = Draft202012Validator({"$ref": f"#/$defs/{definition}", "$defs": SCHEMA["$defs"]})
    problems = [f"{list(error.absolute_path)}: {error.message}" for error in validator.iter_errors(value)]
    assert not problems, f"{definition}: " + "; ".join(problems[:5])


def _event_definition(kind: str) -> str:
    """The specification's event schema for an event type (each pins its type with an enum of one)."""
    spec_kind = SPEC_EVENT_NAMES.get(kind, kind)
    for name, definition in SCHEMA["$defs"].items():
        if not name.endswith("StreamingEvent"):
            continue
        ref = definition["properties"]["type"].get("$ref", "")
        if SCHEMA["$defs"].get(ref.rsplit("/", 1)[-1], {}).get("enum") == [spec_kind]:
            return str(name)
    raise AssertionError(f"the specification has no event {kind!r}")


def conform_event(event: dict[str, Any]) -> None:
    kind = event["type"]
    conform(_event_definition(kind), {**event, "type": SPEC_EVENT_NAMES.get(kind, kind)})


def _image() -> str:
    return "data:image/png;base64," + base64.b64encode(b"\x89PNG a picture").decode()


TURNS: dict[str, dict[str, Any]] = {
    "text": {"input": "hello there"},
    "tools": {"input": "please lookup otters", "tools": [LOOKUP]},
    "reasoning": {"input": "think first", "reasoning": {"effort": "low"}},
    "image": {
        "input": [
            {
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "what is it?"},
                    {"type": "input_image", "image_url": _image()},
                ],
            }
        ]
    },
    "incomplete": {"input": "cut me short", "reasoning": {"effort": "low"}, "max_output_tokens": 16},
    "penalties": {"input": "x", "presence_penalty": 0.5, "frequency_penalty": 0.25, "temperature": 0.3},
}


@pytest.fixture(scope="module")
def open_service(service_factory: Any) -> Service:
    service: Service = service_factory("postgres", backend_mode="cache_ref")
    return service


@pytest.mark.parametrize("turn", TURNS, ids=list(TURNS))
def test_response_objects_conform(open_service: Service, turn: str) -> None:
    http = open_service.http()
    reply = http.post("/v1/responses", json={"model": MODEL, **TURNS[turn]})
    assert reply.status_code == 200, reply.text
    conform("ResponseResource", reply.json())
    conform("ResponseResource", http.get(f"/v1/responses/{reply.json()['id']}").json())
    if turn == "incomplete":
        assert reply.json()["status"] == "incomplete"


def _streamed(service: Service, body: dict[str, Any]) -> list[dict[str, Any]]:
    with service.http() as http, http.stream("POST", "/v1/responses", json={**body, "stream": True}) as reply:
        assert reply.status_code == 200
        return [event for _, event in sse_events(reply)]


@pytest.mark.parametrize("turn", TURNS, ids=list(TURNS))
def test_streamed_events_conform(open_service: Service, turn: str) -> None:
    events = _streamed(open_service, {"model": MODEL, **TURNS[turn]})
    for event in events:
        conform_event(event)
    assert events[-1]["type"] in TERMINAL


def test_failure_events_conform(open_service: Service, backend_admin: httpx.Client) -> None:
    backend_admin.post("/admin/stream", json={"abort_count": 1, "abort_after_chunks": 2}).raise_for_status()
    events = _streamed(open_service, {"model": MODEL, "input": "doomed"})
    assert [event["type"] for event in events[-2:]] == ["error", "response.failed"]
    for event in events:
        conform_event(event)
    conform(
        "ResponseResource", open_service.http().get(f"/v1/responses/{events[0]['response']['id']}").json()
    )


def test_background_objects_conform(open_service: Service) -> None:
    http = open_service.http()
    queued = http.post("/v1/responses", json={"model": MODEL, "input": "later", "background": True}).json()
    conform("ResponseResource", queued)
    deadline = time.monotonic() + 20
    while (fetched := http.get(f"/v1/responses/{queued['id']}").json())["status"] in (
        "queued",
        "in_progress",
    ):
        conform("ResponseResource", fetched)
        assert time.monotonic() < deadline
        time.sleep(0.05)
    conform("ResponseResource", fetched)
    cancelled = http.post("/v1/responses", json={"model": MODEL, "input": "stop", "background": True}).json()
    reply = http.post(f"/v1/responses/{cancelled['id']}/cancel")
    # The turn may finish first under load: then the cancel is refused and there is no object to check.
    if reply.status_code != 409:
        conform("ResponseResource", reply.json())


def _events(service: Service, method: str, path: str, **options: Any) -> list[dict[str, Any]]:
    with service.http() as http, http.stream(method, path, **options) as reply:
        assert reply.status_code == 200
        return [event for _, event in sse_events(reply)]


@pytest.mark.parametrize("turn", ["text", "tools", "reasoning"])
def test_background_stream_events_conform(open_service: Service, turn: str) -> None:
    body = {"model": MODEL, **TURNS[turn], "background": True, "stream": True}
    created = _events(open_service, "POST", "/v1/responses", json=body)
    path = f"/v1/responses/{created[0]['response']['id']}"
    replayed = _events(open_service, "GET", path, params={"stream": "true"})
    resumed = _events(open_service, "GET", path, params={"stream": "true", "starting_after": 2})
    assert replayed == created and resumed == created[3:]
    assert [event["type"] for event in created[:2]] == ["response.created", "response.queued"]
    for event in created:
        conform_event(event)
    assert created[-1]["type"] in TERMINAL


def test_a_cancelled_background_stream_conforms(open_service: Service, backend_admin: httpx.Client) -> None:
    backend_admin.post("/admin/stream", json={"chunk_delay_ms": 200}).raise_for_status()
    try:
        body = {
            "model": MODEL,
            "input": "slowly",
            "background": True,
            "stream": True,
            "max_output_tokens": 200,
        }
        with open_service.http() as http, http.stream("POST", "/v1/responses", json=body) as reply:
            events = sse_events(reply)
            _, created = next(events)
            http.post(f"/v1/responses/{created['response']['id']}/cancel").raise_for_status()
            rest = [event for _, event in events]
    finally:
        backend_admin.post("/admin/stream", json={}).raise_for_status()
    assert rest[-1]["type"] == "response.failed" and rest[-1]["response"]["status"] == "cancelled"
    for event in [created, *rest]:
        conform_event(event)


def _frames(socket: Any) -> Iterator[dict[str, Any]]:
    while True:
        frame = json.loads(socket.recv(timeout=30))
        yield frame
        if frame["type"] in (*TERMINAL, "error"):
            return


def test_websocket_events_and_errors_conform(open_service: Service) -> None:
    url = open_service.url.replace("http://", "ws://") + "/v1/responses"
    with connect(url, additional_headers={"authorization": f"Bearer {open_service.api_key}"}) as socket:
        socket.send(json.dumps({"type": "response.create", "model": MODEL, "input": "over the socket"}))
        events = list(_frames(socket))
        for event in events:
            conform_event(event)
        socket.send(json.dumps({"type": "response.create", "model": MODEL, "input": "x", "bogus": 1}))
        (error,) = _frames(socket)
        conform("WebSocketErrorEvent", error)
        assert error["error"]["code"] == "unknown_parameter"


def test_compaction_conforms(open_service: Service) -> None:
    http = open_service.http()
    first = http.post("/v1/responses", json={"model": MODEL, "input": "remember otters"}).json()
    compacted = http.post("/v1/responses/compact", json={"model": MODEL, "previous_response_id": first["id"]})
    assert compacted.status_code == 200, compacted.text
    conform("CompactResource", compacted.json())


@pytest.mark.parametrize("path", [("presence_penalty",), ("frequency_penalty",), ("tools", 0, "strict")])
def test_the_check_catches_a_missing_required_field(
    open_service: Service, path: tuple[str | int, ...]
) -> None:
    """The check can fail: the fields this service once left out are required by the specification."""
    response = open_service.http().post("/v1/responses", json={"model": MODEL, **TURNS["tools"]}).json()
    conform("ResponseResource", response)
    holder = response
    for key in path[:-1]:
        holder = holder[key]
    del holder[path[-1]]
    with pytest.raises(AssertionError, match=f"'{path[-1]}' is a required property"):
        conform("ResponseResource", response)
