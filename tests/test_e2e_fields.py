"""Request fields beyond the basics: multimodal parts, truncation, logprobs, structured output."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from typing import Any

import pytest
from openai.types.responses import ResponseOutputMessage, ResponseOutputText

from service.backends.reference.config import ReferenceSettings
from service.backends.reference.server import create_app as create_reference_app
from service.serving import ServerThread
from tests.conftest import Service, start_service
from tests.oracle import full_render_digest

MODEL = "ref-chatml"


def _image(payload: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(payload).decode()


def test_image_identity_is_part_of_the_prefix(service: Service) -> None:
    http = service.http()
    digests = []
    for payload in (b"\x89PNG first", b"\x89PNG second"):
        content = [
            {"type": "input_text", "text": "what is this?"},
            {"type": "input_image", "image_url": _image(payload)},
        ]
        reply = http.post(
            "/v1/responses", json={"model": MODEL, "input": [{"role": "user", "content": content}]}
        )
        assert reply.status_code == 200, reply.text
        message = {
            "role": "user",
            "content": [
                {"type": "text", "text": "what is this?"},
                {"type": "image_url", "image_url": {"url": _image(payload)}},
            ],
        }
        assert reply.headers["x-convstate-prompt-digest"] == full_render_digest(
            service.settings.backend_url, MODEL, [message]
        )
        digests.append(reply.headers["x-convstate-prompt-digest"])
    assert digests[0] != digests[1]
    stored = http.get(f"/v1/responses/{reply.json()['id']}/input_items").json()["data"][0]
    assert stored["content"][1] == {
        "type": "input_image",
        "image_url": _image(b"\x89PNG second"),
        "detail": "auto",
    }


def test_file_part_and_malformed_parts(service: Service) -> None:
    http = service.http()
    file_part = {
        "type": "input_file",
        "filename": "notes.txt",
        "file_data": _image(b"hello").replace("image/png", "text/plain"),
    }
    ok = http.post(
        "/v1/responses", json={"model": MODEL, "input": [{"role": "user", "content": [file_part]}]}
    )
    assert ok.status_code == 200, ok.text
    bad = {"type": "input_image", "image_url": "data:image/png;base64,not base64!"}
    reply = http.post("/v1/responses", json={"model": MODEL, "input": [{"role": "user", "content": [bad]}]})
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "input[0].content[0].image_url"


@pytest.fixture(scope="module")
def small_backend() -> Iterator[ServerThread]:
    with ServerThread(create_reference_app(ReferenceSettings(max_model_len=160))) as server:
        yield server


@pytest.fixture(scope="module")
def small_service(migrated_urls: dict[str, str], small_backend: ServerThread) -> Iterator[Service]:
    service = start_service(migrated_urls["postgres"], small_backend.url, backend_mode="cache_ref")
    yield service
    service.server.stop()


def _long_chain(service: Service, truncation: str) -> tuple[str | None, Any]:
    http = service.http()
    previous = None
    for turn in range(12):
        body: dict[str, Any] = {
            "model": MODEL,
            "input": f"turn {turn} " + "word " * 12,
            "max_output_tokens": 16,
            "truncation": truncation,
        }
        if previous:
            body["previous_response_id"] = previous
        reply = http.post("/v1/responses", json=body)
        if reply.status_code != 200:
            return previous, reply
        previous = reply.json()["id"]
    return previous, reply


def test_truncation_disabled_is_a_clear_400(small_service: Service) -> None:
    _, reply = _long_chain(small_service, "disabled")
    assert reply.status_code == 400
    error = reply.json()["error"]
    assert (error["code"], error["param"]) == ("context_length_exceeded", "input")
    assert "maximum context length" in error["message"]


def test_truncation_auto_drops_the_oldest_history(small_service: Service) -> None:
    last, reply = _long_chain(small_service, "auto")
    assert reply.status_code == 200, reply.text
    decisions = reply.headers["x-convstate-decision"]
    assert decisions.startswith("full; reason=truncated:")
    follow = small_service.http().post(
        "/v1/responses",
        json={
            "model": MODEL,
            "input": "more",
            "previous_response_id": last,
            "truncation": "auto",
            "max_output_tokens": 16,
        },
    )
    # The truncated turn offers no handle: its children render a history it did not.
    decision = follow.headers["x-convstate-decision"]
    assert decision == "full; reason=no_handle" or decision.startswith("full; reason=truncated:")


def test_logprobs_and_json_output(service: Service) -> None:
    client = service.openai()
    response = client.responses.create(
        model=MODEL, input="hi", include=["message.output_text.logprobs"], top_logprobs=2
    )
    message = response.output[0]
    assert isinstance(message, ResponseOutputMessage)
    part = message.content[0]
    assert isinstance(part, ResponseOutputText) and part.logprobs, "logprobs were asked for"
    structured = client.responses.create(
        model=MODEL, input="give me json", text={"format": {"type": "json_object"}}
    )
    assert isinstance(json.loads(structured.output_text), dict)
    unknown = service.http().post(
        "/v1/responses", json={"model": MODEL, "input": "x", "include": ["file_search_call.results"]}
    )
    assert unknown.status_code == 400 and unknown.json()["error"]["param"] == "include"
