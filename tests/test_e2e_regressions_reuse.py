"""Regressions for the two wrong reuses found on the cache path, against a backend that trusts every
handle (so only the service's decision can prevent them)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from service.serving import ServerThread
from tests.conftest import Service, start_service
from tests.oracle import assistant_message, full_render_digest

MODEL = "ref-chatml"


@pytest.fixture
def service(migrated_urls: dict[str, str], trusting_backend: ServerThread) -> Iterator[Service]:
    running = start_service(migrated_urls["postgres"], trusting_backend.url, backend_mode="cache_ref")
    try:
        yield running
    finally:
        running.server.stop()


def _tool(properties: dict[str, Any]) -> dict[str, Any]:
    return {"type": "function", "name": "f", "parameters": {"type": "object", "properties": properties}}


def test_a_reordered_tool_schema_is_a_different_prompt(
    service: Service, trusting_backend: ServerThread
) -> None:
    first = _tool({"a": {"type": "string"}, "b": {"type": "integer"}})
    second = _tool({"b": {"type": "integer"}, "a": {"type": "string"}})
    with service.http() as http:
        one = http.post("/v1/responses", json={"model": MODEL, "input": "Hi.", "tools": [first]})
        two = http.post(
            "/v1/responses",
            json={
                "model": MODEL,
                "input": "Again.",
                "tools": [second],
                "previous_response_id": one.json()["id"],
            },
        )
    assert two.headers["x-convstate-decision"] == "full; reason=tools_changed"
    history = [{"role": "user", "content": "Hi."}, assistant_message(one.json()["output"])]
    history.append({"role": "user", "content": "Again."})
    chat_tool = {"type": "function", "function": {"name": "f", "parameters": second["parameters"]}}
    expected = full_render_digest(trusting_backend.url, MODEL, history, tools=[chat_tool])
    assert two.headers["x-convstate-prompt-digest"] == expected


def test_a_child_of_a_running_background_response_is_refused(
    service: Service, trusting_backend: ServerThread
) -> None:
    with service.http() as http, httpx.Client(base_url=trusting_backend.url) as backend:
        backend.post("/admin/latency", json={"ms": 1500}).raise_for_status()
        try:
            parent = http.post("/v1/responses", json={"model": MODEL, "input": "Slow.", "background": True})
            child_body = {"model": MODEL, "input": "Too early.", "previous_response_id": parent.json()["id"]}
            early = http.post("/v1/responses", json=child_body)
        finally:
            backend.post("/admin/latency", json={"ms": 0}).raise_for_status()
        assert early.status_code == 400
        assert early.json()["error"]["code"] == "previous_response_in_progress"
        assert early.json()["error"]["param"] == "previous_response_id"
        for _ in range(200):
            finished = http.get(f"/v1/responses/{parent.json()['id']}").json()
            if finished["status"] == "completed":
                break
            time.sleep(0.05)
        # Once it has finished, its children and grandchildren render its output.
        history = [{"role": "user", "content": "Slow."}, assistant_message(finished["output"])]
        previous = parent.json()["id"]
        for text in ("Now.", "And again."):
            reply = http.post(
                "/v1/responses", json={"model": MODEL, "input": text, "previous_response_id": previous}
            )
            history.append({"role": "user", "content": text})
            assert reply.headers["x-convstate-prompt-digest"] == full_render_digest(
                trusting_backend.url, MODEL, history
            )
            history.append(assistant_message(reply.json()["output"]))
            previous = reply.json()["id"]
        assert reply.headers["x-convstate-decision"] == "cache_ref; reason=hit"
