"""What the service makes of a backend's errors and credentials: the error bodies real servers send
(vLLM across versions, llama.cpp, OpenAI), the backend API key, and /readyz's report of the backend."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest

from service.backends.client import BackendMiss, backend_error
from service.backends.reference.config import ReferenceSettings
from service.backends.reference.server import create_app as create_reference_app
from service.errors import BackendUnavailable, ContextLengthExceeded, ConvstateError, InvalidRequest
from service.serving import ServerThread, free_port
from tests.conftest import Service, start_service

MODEL = "ref-chatml"
KEY = "backend-secret"


def _vllm(message: str, param: str | None = None) -> bytes:
    error = {"message": message, "type": "BadRequestError", "param": param, "code": 400}
    return orjson.dumps({"error": error})


@pytest.mark.parametrize(
    "body",
    [
        # vLLM 0.32
        _vllm(
            "This model's maximum context length is 2048 tokens. However, your prompt contains 3000 input "
            "tokens, which exceeds this limit even without any output tokens. Please reduce the length of "
            "the input prompt.",
            "input_tokens",
        ),
        _vllm(
            "This model's maximum context length is 2048 tokens. However, your prompt contains 90000 "
            "characters (more than 61410 characters, which is the upper bound for 2047 input tokens).",
            "input_text",
        ),
        _vllm("Input length (3000) exceeds model's maximum context length (2048)."),
        # older vLLM
        _vllm(
            "You passed 3000 input tokens and requested 16 output tokens. However, the model's context "
            "length is only 2048 tokens, resulting in a maximum input length of 2032 tokens. Please reduce "
            "the length of the input prompt.",
            "input_tokens",
        ),
        _vllm(
            "'max_tokens' or 'max_completion_tokens' is too large: 100. This model's maximum context length "
            "is 2048 tokens and your request has 2000 input tokens (100 > 2048 - 2000).",
            "max_tokens",
        ),
        # llama.cpp, whose wording moves between builds while its error type does not
        orjson.dumps(
            {
                "error": {
                    "code": 400,
                    "message": "request (4476 tokens) exceeds the available context size (4096 tokens), "
                    "try increasing it",
                    "type": "exceed_context_size_error",
                    "n_prompt_tokens": 4476,
                    "n_ctx": 4096,
                }
            }
        ),
        orjson.dumps({"error": {"code": 400, "message": "too long", "type": "exceed_context_size_error"}}),
        orjson.dumps(
            {
                "error": {
                    "code": 400,
                    "message": "input (5000 tokens) is larger than the max context size (4096 tokens). "
                    "skipping",
                    "type": "invalid_request_error",
                }
            }
        ),
        # OpenAI
        orjson.dumps(
            {
                "error": {
                    "message": "Your input exceeds the context window of this model.",
                    "type": "invalid_request_error",
                    "param": "input",
                    "code": "context_length_exceeded",
                }
            }
        ),
    ],
)
def test_context_length_errors_in_every_servers_wording(body: bytes) -> None:
    error = backend_error(400, body)
    assert isinstance(error, ContextLengthExceeded)
    assert (error.status, error.param, error.code) == (400, "input", "context_length_exceeded")


def test_other_bad_requests_are_not_context_length() -> None:
    error = backend_error(400, _vllm("temperature must be non-negative", "temperature"))
    assert type(error) is InvalidRequest


@pytest.mark.parametrize(
    "body", [_vllm("bad value"), orjson.dumps({"error": {"message": "bad", "code": 7}}), b"not json", b""]
)
def test_integer_backend_codes_never_become_client_codes(body: bytes) -> None:
    error = backend_error(422, body)
    assert isinstance(error, ConvstateError) and error.code is None


def test_string_codes_pass_through() -> None:
    error = {"message": "no", "type": "invalid_request_error", "code": "invalid_value"}
    body = orjson.dumps({"error": error})
    assert backend_error(400, body).code == "invalid_value"


@pytest.mark.parametrize("status", [401, 403])
@pytest.mark.parametrize("body", [orjson.dumps({"error": "Unauthorized"}), _vllm("Invalid API key")])
def test_backend_auth_failures_are_the_operators_502(status: int, body: bytes) -> None:
    error = backend_error(status, body)
    assert isinstance(error, BackendUnavailable)
    assert (error.status, error.type, error.code) == (502, "server_error", "backend_unavailable")
    assert "credentials" in error.message and "Unauthorized" not in error.message


def test_a_typed_cache_miss_stays_a_miss() -> None:
    body = orjson.dumps({"error": {"message": "gone", "type": "prompt_cache_miss", "code": "unknown_ref"}})
    error = backend_error(409, body)
    assert isinstance(error, BackendMiss) and error.code == "unknown_ref"


# --- over HTTP, against a reference backend that requires an API key (as vLLM's --api-key does) -------


@pytest.fixture(scope="module")
def keyed_backend() -> Iterator[ServerThread]:
    with ServerThread(create_reference_app(ReferenceSettings(api_key=KEY))) as server:
        yield server


@pytest.fixture(scope="module")
def keyed_services(
    migrated_urls: dict[str, str], keyed_backend: ServerThread
) -> Iterator[dict[str, Service]]:
    services = {
        "with_key": start_service(migrated_urls["postgres"], keyed_backend.url, backend_api_key=KEY),
        "without_key": start_service(migrated_urls["postgres"], keyed_backend.url),
        "wrong_key": start_service(migrated_urls["postgres"], keyed_backend.url, backend_api_key="nope"),
    }
    yield services
    for service in services.values():
        service.server.stop()


def test_the_backend_api_key_is_sent_as_a_bearer_token(keyed_services: dict[str, Service]) -> None:
    client = keyed_services["with_key"].openai()
    first = client.responses.create(model=MODEL, input="hello", max_output_tokens=16)
    second = client.responses.create(model=MODEL, input="again", previous_response_id=first.id)
    assert second.status == "completed"
    assert keyed_services["with_key"].http().get("/readyz").json()["backend"] == "ok"


@pytest.mark.parametrize("which", ["without_key", "wrong_key"])
@pytest.mark.parametrize("stream", [False, True])
def test_a_backend_refusing_the_services_credentials_is_a_clear_502(
    keyed_services: dict[str, Service], which: str, stream: bool
) -> None:
    service = keyed_services[which]
    body: dict[str, Any] = {"model": MODEL, "input": "hello", "stream": stream}
    reply = service.http().post("/v1/responses", json=body)
    assert reply.status_code == 502
    error = reply.json()["error"]
    assert (error["type"], error["code"]) == ("server_error", "backend_unavailable")
    assert "credentials" in error["message"]
    assert service.settings.backend_url not in error["message"] and "Unauthorized" not in error["message"]


def test_readyz_reports_the_backend_without_failing_on_it(
    keyed_services: dict[str, Service], migrated_urls: dict[str, str]
) -> None:
    refused = keyed_services["without_key"].http().get("/readyz")
    assert refused.status_code == 200 and refused.json()["backend"] == "unauthorized"
    down = start_service(migrated_urls["postgres"], f"http://127.0.0.1:{free_port()}")
    try:
        reply = httpx.get(f"{down.url}/readyz", timeout=10)
    finally:
        down.server.stop()
    assert reply.status_code == 200
    assert reply.json() == {"status": "ok", "database": reply.json()["database"], "backend": "unreachable"}


def test_a_backend_rejection_with_an_integer_code_reaches_the_client_as_null(
    service: Service, backend_admin: httpx.Client
) -> None:
    backend_admin.post("/admin/fail", json={"count": 1, "status": 422})
    reply = service.http().post("/v1/responses", json={"model": MODEL, "input": "hello"})
    assert reply.status_code == 400
    assert reply.json()["error"]["code"] is None
