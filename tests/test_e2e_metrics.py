"""Prometheus metrics: requests by templated route, decisions by path and reason, bytes forwarded."""

from __future__ import annotations

from tests.conftest import Service


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
