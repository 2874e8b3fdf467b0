"""Streaming over real HTTP: the SDK parses every event, the order and sequence numbers are OpenAI's, the
turn is stored before the terminal event, and neither a client that leaves nor a backend that dies mid-
stream leaves a response in progress."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest
from openai.types.responses import (
    ResponseCompletedEvent,
    ResponseFunctionCallArgumentsDeltaEvent,
    ResponseFunctionToolCall,
    ResponseStreamEvent,
)
from openai.types.responses.function_tool_param import FunctionToolParam
from pydantic import TypeAdapter

from tests.conftest import Service
from tests.oracle import full_render_digest
from tests.sse import sse_events

EVENTS: TypeAdapter[Any] = TypeAdapter(ResponseStreamEvent)
LOOKUP: FunctionToolParam = {
    "type": "function",
    "name": "lookup",
    "parameters": {"type": "object", "properties": {"word": {"type": "string"}}, "required": ["word"]},
    "strict": False,
}


def _stream(service: Service, **body: Any) -> tuple[httpx.Headers, list[dict[str, Any]]]:
    with service.http() as http, http.stream("POST", "/v1/responses", json={"stream": True, **body}) as reply:
        assert reply.status_code == 200
        assert reply.headers["content-type"].startswith("text/event-stream")
        events = []
        for name, event in sse_events(reply):
            assert name == event["type"]
            EVENTS.validate_python(event)  # the SDK's own event union
            events.append(event)
        return reply.headers, events


@pytest.fixture
def cache_service(service_factory: Any) -> Service:
    service: Service = service_factory("postgres", backend_mode="cache_ref")
    return service


def test_event_order_sequence_and_final_object(cache_service: Service) -> None:
    headers, events = _stream(
        cache_service, model="ref-chatml", input="stream me", reasoning={"effort": "low"}
    )
    assert [event["sequence_number"] for event in events] == list(range(len(events)))
    kinds = [event["type"] for event in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] == "response.completed" and kinds.count("response.completed") == 1
    assert kinds[2:5] == [
        "response.output_item.added",
        "response.content_part.added",
        "response.reasoning_text.delta",
    ]
    message_start = kinds.index("response.content_part.added", 5)
    assert kinds[message_start + 1] == "response.output_text.delta"
    assert kinds[-4:-1] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
    ]
    done = next(event for event in events if event["type"] == "response.output_text.done")
    deltas = "".join(event["delta"] for event in events if event["type"] == "response.output_text.delta")
    assert done["text"] == deltas
    final = events[-1]["response"]
    fetched = cache_service.http().get(f"/v1/responses/{final['id']}").json()
    assert fetched == final  # committed before the terminal event, and identical
    assert headers["x-convstate-decision"] == "full; reason=no_parent"


def test_sdk_stream_helper_and_cache_path(cache_service: Service) -> None:
    client = cache_service.openai()
    first = client.responses.create(model="ref-chatml", input="one")
    with client.responses.stream(model="ref-chatml", input="two", previous_response_id=first.id) as stream:
        texts = [event.delta for event in stream if event.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(texts) == final.output_text and final.status == "completed"
    # The streamed cache-path turn generated from exactly the full history.
    raw = client.responses.with_raw_response.create(
        model="ref-chatml", input="three", previous_response_id=final.id
    )
    assert raw.headers["x-convstate-decision"] == "cache_ref; reason=hit"
    messages = [
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "two"},
        {"role": "assistant", "content": final.output_text},
        {"role": "user", "content": "three"},
    ]
    assert raw.headers["x-convstate-prompt-digest"] == full_render_digest(
        cache_service.settings.backend_url, "ref-chatml", messages
    )


def test_function_tool_round_trip_streamed(cache_service: Service) -> None:
    client = cache_service.openai()
    events = list(
        client.responses.create(model="ref-chatml", input="please lookup otters", tools=[LOOKUP], stream=True)
    )
    assert isinstance(events[-1], ResponseCompletedEvent)
    final = events[-1].response
    (call,) = [item for item in final.output if isinstance(item, ResponseFunctionToolCall)]
    arguments = "".join(e.delta for e in events if isinstance(e, ResponseFunctionCallArgumentsDeltaEvent))
    assert call.name == "lookup" and arguments == call.arguments
    follow = client.responses.create(
        model="ref-chatml",
        previous_response_id=final.id,
        tools=[LOOKUP],
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "otters are mustelids"}],
    )
    assert "otters are mustelids" in follow.output_text


def _wait_terminal(service: Service, response_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        reply = service.http().get(f"/v1/responses/{response_id}")
        if reply.status_code == 200 and reply.json()["status"] not in ("queued", "in_progress"):
            body: dict[str, Any] = reply.json()
            return body
        time.sleep(0.05)
    raise AssertionError(f"{response_id} never reached a terminal status")


def test_a_stream_is_stored_from_response_created_on_and_survives_its_client_leaving(
    cache_service: Service, backend_admin: httpx.Client
) -> None:
    # The reply is a handful of chunks: slow enough that the stream is still running when the client has
    # read its first events and left, even on a loaded machine (at 20 ms it could end first).
    backend_admin.post("/admin/stream", json={"chunk_delay_ms": 400}).raise_for_status()
    try:
        with (
            cache_service.http() as http,
            http.stream(
                "POST", "/v1/responses", json={"model": "ref-chatml", "input": "long answer", "stream": True}
            ) as reply,
        ):
            events = sse_events(reply)
            _, created = next(events)
            # The id was announced: it is retrievable at once, from any replica.
            running = cache_service.http().get(f"/v1/responses/{created['response']['id']}")
            assert running.status_code == 200 and running.json()["status"] == "in_progress"
            next(events)
            next(events)
        # The connection is closed here, mid-stream.
        stored = _wait_terminal(cache_service, created["response"]["id"])
    finally:
        backend_admin.post("/admin/stream", json={}).raise_for_status()
    assert stored["status"] == "completed" and stored["output"][0]["content"][0]["text"]


@pytest.mark.parametrize("abort_as", ["disconnect", "error"])
def test_backend_dying_mid_stream_gives_error_then_failed(
    cache_service: Service, backend_admin: httpx.Client, abort_as: str
) -> None:
    fault = {"abort_count": 1, "abort_after_chunks": 2, "abort_as": abort_as}
    backend_admin.post("/admin/stream", json=fault).raise_for_status()
    _, events = _stream(cache_service, model="ref-chatml", input="doomed")
    kinds = [event["type"] for event in events]
    assert kinds[-2:] == ["error", "response.failed"]
    failed = events[-1]["response"]
    assert events[-2]["code"] == "backend_unavailable"
    assert failed["status"] == "failed" and failed["error"]["code"] == "server_error"
    assert _wait_terminal(cache_service, failed["id"])["status"] == "failed"


def test_errors_before_the_stream_are_plain_json(cache_service: Service) -> None:
    reply = cache_service.http().post(
        "/v1/responses",
        json={"model": "ref-chatml", "input": "x", "stream": True, "previous_response_id": "resp_x"},
    )
    assert reply.status_code == 400 and reply.json()["error"]["code"] == "previous_response_not_found"


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param([{"content": "\u0000"}], id="a value Postgres rejects"),
        pytest.param([{"reasoning_content": "late"}, {"content": "more"}], id="reasoning after text"),
    ],
)
def test_a_turn_that_cannot_be_stored_still_ends(
    cache_service: Service, backend_admin: httpx.Client, extra: list[dict[str, Any]]
) -> None:
    backend_admin.post("/admin/stream", json={"extra_deltas": extra}).raise_for_status()
    try:
        _, events = _stream(cache_service, model="ref-chatml", input="break the write")
    finally:
        backend_admin.post("/admin/stream", json={}).raise_for_status()
    kinds = [event["type"] for event in events]
    assert kinds[0] == "response.created" and kinds[-2:] == ["error", "response.failed"]
    error = events[-2]
    assert error["code"] == "server_error" and "Traceback" not in error["message"]
    failed = events[-1]["response"]
    assert failed["status"] == "failed" and failed["error"]["code"] == "server_error"
    stored = _wait_terminal(cache_service, events[0]["response"]["id"])
    assert stored["status"] == "failed" and stored["error"] == failed["error"]
