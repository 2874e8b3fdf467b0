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


def _create(connection: Any, **fields: Any) -> Any:
    """Send one response.create; its terminal event (or error)."""
    connection.send({"type": "response.create", "model": "ref-chatml", **fields})
    return _until_terminal(connection)[-1]


def test_a_connection_continues_its_unstored_responses(service: Service, backend_admin: Any) -> None:
    client = service.openai()
    with client.responses.connect() as connection, client.responses.connect() as other:
        first = _create(connection, input="Remember the word heron.", store=False).response
        second = _create(connection, input="Which word?", store=False, previous_response_id=first.id)
        assert second.type == "response.completed", second
        # The whole history went to the backend, from the connection's memory: nothing was stored.
        history_tokens = first.usage.input_tokens + first.usage.output_tokens
        assert second.response.usage.input_tokens > history_tokens
        third = _create(connection, input="Again?", store=False, previous_response_id=second.response.id)
        assert third.response.usage.input_tokens > second.response.usage.input_tokens
        # Another connection does not know it, and a stored response cannot continue it.
        missing = _create(other, input="Which word?", store=False, previous_response_id=first.id)
        assert (missing.type, missing.error.code) == ("error", "previous_response_not_found")
        stored = _create(connection, input="x", previous_response_id=first.id)
        assert (stored.type, stored.error.param) == ("error", "store")
        # A failed continuation forgets what it continued.
        backend_admin.post("/admin/fail", json={"count": 1, "status": 400}).raise_for_status()
        failed = _create(connection, input="x", store=False, previous_response_id=third.response.id)
        assert failed.type == "error", failed
        again = _create(connection, input="x", store=False, previous_response_id=third.response.id)
        assert (again.type, again.error.code) == ("error", "previous_response_not_found")


def test_a_connection_keeps_a_bounded_number_of_responses(service_factory: Any) -> None:
    service: Service = service_factory("postgres", websocket_cached_responses=2)
    with service.openai().responses.connect() as connection:
        ids = [_create(connection, input=f"turn {n}", store=False).response.id for n in range(3)]
        # The oldest went out; of the rest, the least recently used goes when a new one comes.
        assert _create(connection, input="x", store=False, previous_response_id=ids[1]).type == (
            "response.completed"
        )
        for gone in (ids[0], ids[2]):
            dropped = _create(connection, input="x", store=False, previous_response_id=gone)
            assert (dropped.type, dropped.error.code) == ("error", "previous_response_not_found")
        assert _create(connection, input="y", store=False, previous_response_id=ids[1]).type == (
            "response.completed"
        )
