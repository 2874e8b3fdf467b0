"""vLLM's refusals as the service's clients see them: a prompt over the context window (and
`truncation: auto`), an unknown model, and a vLLM that requires an API key the service lacks."""

from __future__ import annotations

from typing import Any

import httpx
import openai
import pytest

from tests.conftest import Service
from tests.vllm.conftest import Vllm

pytestmark = pytest.mark.vllm

# About 1,200 tokens: two of them overflow the lane's 2,048-token context window, one fits.
LONG = "The keeper climbed the stairs of the lighthouse and lit the lamp again. " * 80


def _error(reply: httpx.Response) -> dict[str, Any]:
    error: dict[str, Any] = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["code"], str | None)
    assert "http://" not in error["message"] and "Traceback" not in error["message"]
    return error


def test_a_prompt_over_the_context_window_is_a_400(vllm_service: Any, vllm: Vllm) -> None:
    reply = vllm_service("full").http().post("/v1/responses", json={"model": vllm.model, "input": LONG * 2})
    assert reply.status_code == 400
    error = _error(reply)
    assert (error["type"], error["param"], error["code"]) == (
        "invalid_request_error",
        "input",
        "context_length_exceeded",
    )


@pytest.mark.parametrize("mode", ["full", "affinity"])
def test_truncation_auto_drops_the_oldest_history(vllm_service: Any, vllm: Vllm, mode: str) -> None:
    client = vllm_service(mode).openai()
    first = client.responses.create(
        model=vllm.model, input=LONG + "Reply with one word.", max_output_tokens=16
    )
    second: dict[str, Any] = {
        "model": vllm.model,
        "input": LONG + "Reply with two words.",
        "previous_response_id": first.id,
        "max_output_tokens": 16,
    }
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(**second)
    assert refused.value.code == "context_length_exceeded"
    raw = client.responses.with_raw_response.create(**second, truncation="auto")
    assert raw.parse().output_text
    assert raw.headers["x-convstate-decision"] == "full; reason=truncated:1"


def test_an_unknown_model_is_a_400(vllm_service: Any) -> None:
    reply = vllm_service("full").http().post("/v1/responses", json={"model": "no-such-model", "input": "hi"})
    assert reply.status_code == 400
    error = _error(reply)
    assert (error["param"], error["code"]) == ("model", "model_not_found")


def test_a_vllm_that_requires_an_api_key(vllm_service: Any, vllm: Vllm) -> None:
    keyed: Service = vllm_service("full")
    assert keyed.http().get("/readyz").json()["backend"] == "ok"
    for key in (None, "wrong"):
        service: Service = vllm_service("full", backend_api_key=key)
        ready = service.http().get("/readyz")
        assert ready.status_code == 200 and ready.json()["backend"] == "unauthorized"
        reply = service.http().post("/v1/responses", json={"model": vllm.model, "input": "hi"})
        assert reply.status_code == 502
        error = _error(reply)
        assert (error["type"], error["code"]) == ("server_error", "backend_unavailable")
        assert "credentials" in error["message"]
