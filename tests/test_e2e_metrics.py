"""Prometheus metrics: requests by templated route, decisions by path and reason, bytes forwarded."""

from __future__ import annotations

import contextlib
import gc
import logging
from typing import Any

import pytest
from opentelemetry import trace
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect
from websockets.typing import Origin

from service.api.direct import DirectDispatch
from service.api.middleware import RequestAccounting
from service.serving import ServerThread
from tests.conftest import Service, start_service


def test_metrics_count_decisions_and_routes(service: Service) -> None:
    client = service.openai()
    created = client.responses.create(model="ref-chatml", input="count me")
    client.responses.retrieve(created.id)
    text = service.http().get("/metrics").text
    assert 'convstate_decisions_total{path="full",reason="mode_full"}' in text
    assert 'route="/v1/responses/{response_id}"' in text  # templated, so label cardinality stays bounded
    # A turn is served straight from the front door (service/api/direct.py), still under its route.
    assert 'convstate_requests_total{method="POST",route="/v1/responses",status="200"}' in text
    assert "convstate_backend_bytes_sent_total" in text and "convstate_stage_seconds_bucket" in text


def test_the_turns_route_is_dispatched_directly_inside_the_accounting(service: Service) -> None:
    """The request's accounting is the app's outermost layer, and it hands a turn to the direct dispatch
    (service/api/direct.py), which knows the turn's route: no router or FastAPI middleware in between."""
    service.openai().responses.create(model="ref-chatml", input="built")  # the stack is built on first use
    stack = service.app.middleware_stack
    assert isinstance(stack, RequestAccounting) and isinstance(stack.app, DirectDispatch)
    assert stack.app.routes() == [("POST", "/v1/responses")]


class _ServerSpans(trace.TracerProvider):
    """An OpenTelemetry tracer provider that notes the server spans started through it, as (port, path)."""

    def __init__(self) -> None:
        self.seen: list[tuple[object, object]] = []

    def get_tracer(self, *args: Any, **kwargs: Any) -> trace.Tracer:
        return _NotingTracer(self.seen)


class _NotingTracer(trace.NoOpTracer):
    def __init__(self, seen: list[tuple[object, object]]) -> None:
        self._seen = seen

    def start_span(self, name: str, *args: Any, **kwargs: Any) -> trace.Span:
        if kwargs.get("kind") is trace.SpanKind.SERVER:
            attributes = kwargs.get("attributes") or {}
            self._seen.append((attributes.get("server.port"), attributes.get("url.path")))
        return super().start_span(name, *args, **kwargs)


def test_opentelemetry_spans_only_when_asked_for(service_factory: Any) -> None:
    """With providers configured in the process, FastAPI's native telemetry makes a span per request
    when CONVSTATE_OPENTELEMETRY is on, and none when it is off (the default)."""
    spans = _ServerSpans()
    # The process's provider, for good: services with the setting off ignore it (the reference backend,
    # a FastAPI app in this process too, does not, so spans are told apart by port).
    trace.set_tracer_provider(spans)
    for on in (True, False):
        service = service_factory(opentelemetry=on)
        port = int(service.url.rsplit(":", 1)[1])
        spans.seen.clear()
        service.openai().responses.create(model="ref-chatml", input="traced?")
        assert [path for at, path in spans.seen if at == port] == (["/v1/responses"] if on else [])


def test_what_start_up_made_is_out_of_the_collectors_reach(service: Service) -> None:
    """A full collection while serving walks what serving made, not the app, its pools and what imports
    made: the service freezes those once started (service/app.py)."""
    assert all(tracked is not service.app for tracked in gc.get_objects())


def test_each_request_has_an_access_line_by_shutdown_at_the_latest(
    migrated_urls: dict[str, str], reference_backend: ServerThread, caplog: pytest.LogCaptureFixture
) -> None:
    """The service's own access log (service/logs.py), one line per request under its request id; lines
    still waiting for their batch are written when the service stops."""
    caplog.set_level(logging.INFO, logger="convstate.access")
    service = start_service(migrated_urls["postgres"], reference_backend.url)
    try:
        http = service.http()
        turn = http.post("/v1/responses", json={"model": "ref-chatml", "input": "logged"})
        missing = http.get("/v1/responses/resp_missing")
        socket = service.url.replace("http://", "ws://") + "/v1/responses"
        headers = {"authorization": f"Bearer {service.api_key}"}
        for origin, request_id in (
            (None, "req-socket-accepted"),
            ("https://elsewhere.example", "req-socket-refused"),
        ):
            with contextlib.suppress(InvalidStatus):  # the cross-origin page is refused
                connect(
                    socket,
                    origin=Origin(origin) if origin else None,
                    additional_headers={**headers, "x-request-id": request_id},
                ).close()
    finally:
        service.server.stop()
    lines = {
        record.__dict__["request_id"]: record.getMessage()
        for record in caplog.records
        if record.name == "convstate.access"
    }
    assert lines[turn.headers["x-request-id"]] == "POST /v1/responses 200"
    assert lines[missing.headers["x-request-id"]] == "GET /v1/responses/resp_missing 404"
    assert lines["req-socket-accepted"] == "WEBSOCKET /v1/responses 101"
    assert lines["req-socket-refused"] == "WEBSOCKET /v1/responses 403"
