"""The Responses WebSocket mode, driven by the official SDK's `responses.connect()`: sequential responses on
one connection, continuation by previous_response_id, typed errors as `error` events."""

from __future__ import annotations

from typing import Any

from openai.types.responses import ResponseCompletedEvent

from tests.conftest import Service


def _until_terminal(connection: Any) -> list[Any]:
    events = []
    for event in connection:
        events.append(event)
        if event.type in ("response.completed", "response.incomplete", "response.failed", "error"):
            return events
    raise AssertionError("the socket closed before a terminal event")


def test_sequential_responses_on_one_socket(service_factory: Any) -> None:
    service: Service = service_factory("postgres", backend_mode="cache_ref")
    client = service.openai()
    with client.responses.connect() as connection:
        connection.send({"type": "response.create", "model": "ref-chatml", "input": "first"})
        first = _until_terminal(connection)
        assert [event.sequence_number for event in first] == list(range(len(first)))
        assert isinstance(first[-1], ResponseCompletedEvent)
        first_id = first[-1].response.id
        connection.send(
            {
                "type": "response.create",
                "model": "ref-chatml",
                "input": "second",
                "previous_response_id": first_id,
            }
        )
        second = _until_terminal(connection)
        assert isinstance(second[-1], ResponseCompletedEvent)
        assert second[-1].response.previous_response_id == first_id
        connection.send(
            {
                "type": "response.create",
                "model": "ref-chatml",
                "input": "x",
                "previous_response_id": "resp_nope",
            }
        )
        (error,) = _until_terminal(connection)
        assert error.type == "error" and error.error.code == "previous_response_not_found"
        assert error.status == 400
        # The connection survives an error.
        connection.send(
            {"type": "response.create", "model": "ref-chatml", "input": "third", "stream_id": "s3"}
        )
        third = _until_terminal(connection)
        assert third[-1].type == "response.completed"
        assert {getattr(event, "stream_id", None) for event in third} == {"s3"}
    fetched = client.responses.retrieve(second[-1].response.id)
    assert fetched.output_text == second[-1].response.output_text
