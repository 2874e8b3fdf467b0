"""The Responses API end to end: the service and the reference backend over real HTTP, the openai SDK
as the client, Postgres underneath."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import openai
import pytest
from openai.types.responses import Response

from service.serving import free_port
from service.store.migrate import head_revision
from tests.conftest import Service
from tests.oracle import full_render_digest

MODEL = "ref-chatml"


def _create(client: openai.OpenAI, **kwargs: Any) -> tuple[Response, Mapping[str, str]]:
    raw = client.responses.with_raw_response.create(model=kwargs.pop("model", MODEL), **kwargs)
    # Strict validation against the SDK's own types: required fields present, types right.
    validated = Response.model_validate(raw.http_response.json())
    return validated, raw.headers


def _error(reply: httpx.Response) -> dict[str, Any]:
    body = reply.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    error: dict[str, Any] = body["error"]
    return error


def test_ten_turn_chain_backend_saw_exactly_the_full_history(service: Service) -> None:
    client = service.openai()
    expected: list[dict[str, Any]] = [{"role": "system", "content": "Be brief."}]
    previous = None
    for turn in range(10):
        question = f"Question {turn}: what is {turn} squared?"
        expected.append({"role": "user", "content": question})
        response, headers = _create(
            client,
            input=question,
            instructions="Be brief.",
            previous_response_id=previous,
            max_output_tokens=128,
        )
        assert response.status == "completed"
        assert headers["x-convstate-prompt-digest"] == full_render_digest(
            service.settings.backend_url, MODEL, expected
        )
        assert headers["x-convstate-decision"] == "full; reason=mode_full"
        expected.append({"role": "assistant", "content": response.output_text})
        previous = response.id
    assert response.usage is not None and response.usage.input_tokens > 0
    assert response.output[0].type == "message" and response.output[0].status == "completed"


def test_branches_see_only_their_own_lineage(service: Service) -> None:
    client = service.openai()
    root, _ = _create(client, input="root question")
    history = [
        {"role": "user", "content": "root question"},
        {"role": "assistant", "content": root.output_text},
    ]
    for branch in ("left", "right"):
        child, headers = _create(client, input=branch, previous_response_id=root.id)
        messages = [*history, {"role": "user", "content": branch}]
        assert headers["x-convstate-prompt-digest"] == full_render_digest(
            service.settings.backend_url, MODEL, messages
        )
        assert child.previous_response_id == root.id


def test_forks_and_racing_siblings_each_render_their_own_lineage(service: Service) -> None:
    """A straight run, a fork of it, a fork of the fork and four children of one parent sent at once
    (they race for its thread: one continues it, the others start their own): every turn's prompt is
    the full render of its own lineage, read back from the store."""
    lineages: dict[str | None, list[dict[str, Any]]] = {None: []}

    def turn(parent: str | None, text: str) -> str:
        response, headers = _create(service.openai(), input=text, previous_response_id=parent)
        messages = [*lineages[parent], {"role": "user", "content": text}]
        assert headers["x-convstate-prompt-digest"] == full_render_digest(
            service.settings.backend_url, MODEL, messages
        )
        lineages[response.id] = [*messages, {"role": "assistant", "content": response.output_text}]
        return response.id

    run = [turn(None, "root")]
    for depth in range(1, 4):
        run.append(turn(run[-1], f"run {depth}"))
    fork = [turn(run[1], "fork 1")]
    fork.append(turn(fork[-1], "fork 2"))
    turn(fork[0], "fork of the fork")
    with ThreadPoolExecutor(4) as pool:
        siblings = list(pool.map(lambda n: turn(run[2], f"sibling {n}"), range(4)))
    for sibling in siblings:
        turn(sibling, "after the race")
    turn(run[-1], "the run goes on")


def test_instructions_are_not_inherited(service: Service) -> None:
    client = service.openai()
    first, _ = _create(client, input="hello", instructions="Speak like a pirate.")
    second, headers = _create(client, input="again", previous_response_id=first.id)
    assert second.instructions is None
    messages = [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "again"},
    ]
    assert headers["x-convstate-prompt-digest"] == full_render_digest(
        service.settings.backend_url, MODEL, messages
    )


def test_retrieve_delete_and_echoed_fields(service: Service) -> None:
    client = service.openai()
    created, _ = _create(
        client,
        input="keep me",
        metadata={"k": "v"},
        temperature=0.5,
        top_p=0.9,
        extra_body={"presence_penalty": 0.25, "frequency_penalty": -0.5},
        prompt_cache_key="pck",
        safety_identifier="user-1",
    )
    fetched = client.responses.retrieve(created.id)
    assert fetched.model_dump() == created.model_dump()
    assert (fetched.metadata, fetched.temperature, fetched.top_p) == ({"k": "v"}, 0.5, 0.9)
    echoed = service.http().get(f"/v1/responses/{created.id}").json()
    assert (echoed["presence_penalty"], echoed["frequency_penalty"]) == (0.25, -0.5)
    assert (fetched.prompt_cache_key, fetched.safety_identifier) == ("pck", "user-1")
    deleted = service.http().delete(f"/v1/responses/{created.id}").json()
    assert deleted == {"id": created.id, "object": "response.deleted", "deleted": True}
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(created.id)


def test_input_items_pagination(service: Service) -> None:
    client = service.openai()
    created, _ = _create(client, input=[{"role": "user", "content": f"part {i}"} for i in range(5)])
    ids = [item.id for item in client.responses.input_items.list(created.id, order="asc", limit=100)]
    assert len(ids) == 5
    page = client.responses.input_items.list(created.id, order="asc", limit=2)
    assert [item.id for item in page.data] == ids[:2] and page.has_more
    # Iterating the page auto-paginates: the SDK follows has_more and last_id.
    assert [item.id for item in client.responses.input_items.list(created.id, order="asc", limit=2)] == ids
    desc = service.http().get(f"/v1/responses/{created.id}/input_items", params={"limit": 3}).json()
    assert [item["id"] for item in desc["data"]] == ids[::-1][:3]
    assert (desc["first_id"], desc["last_id"], desc["has_more"]) == (ids[4], ids[2], True)
    last = service.http().get(f"/v1/responses/{created.id}/input_items", params={"after": ids[2]}).json()
    assert [item["id"] for item in last["data"]] == ids[1::-1] and last["has_more"] is False


def test_store_false_cannot_be_retrieved_or_continued(service: Service) -> None:
    client = service.openai()
    raw = client.responses.with_raw_response.create(model=MODEL, input="forget me", store=False)
    ephemeral = raw.parse()
    assert raw.http_response.json()["store"] is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(ephemeral.id)
    reply = service.http().post(
        "/v1/responses", json={"model": MODEL, "input": "x", "previous_response_id": ephemeral.id}
    )
    assert reply.status_code == 400
    assert _error(reply)["code"] == "previous_response_not_found"


@pytest.mark.parametrize(
    ("body", "status", "param", "code"),
    [
        (
            {"model": MODEL, "input": "x", "previous_response_id": "resp_nope"},
            400,
            "previous_response_id",
            "previous_response_not_found",
        ),
        ({"model": MODEL}, 400, "input", "invalid_value"),
        ({"model": MODEL, "input": "x", "temperature": 5}, 400, "temperature", "decimal_above_max_value"),
        (
            {"model": MODEL, "input": "x", "presence_penalty": -3},
            400,
            "presence_penalty",
            "decimal_below_min_value",
        ),
        (
            {"model": MODEL, "input": "x", "max_output_tokens": 15},
            400,
            "max_output_tokens",
            "integer_below_min_value",
        ),
        (
            {"model": MODEL, "input": "x", "metadata": {f"k{i}": "v" for i in range(17)}},
            400,
            "metadata",
            "invalid_value",
        ),
        ({"model": MODEL, "input": "x", "metadata": {"k": "v" * 513}}, 400, "metadata", "invalid_value"),
        ({"model": MODEL, "input": "x", "bogus": 1}, 400, "bogus", "unknown_parameter"),
        ({"model": MODEL, "input": "x", "text": {"bogus": 1}}, 400, "text.bogus", "unknown_parameter"),
        ({"model": MODEL, "input": "x", "tool_choice": "sometimes"}, 400, "tool_choice", "invalid_value"),
        ({"model": MODEL, "input": [{"role": "robot", "content": "x"}]}, 400, "input[0].role", None),
        ({"model": "no-such-model", "input": "x"}, 400, "model", "model_not_found"),
    ],
)
def test_errors_use_the_openai_envelope(
    service: Service, body: dict[str, Any], status: int, param: str, code: str | None
) -> None:
    reply = service.http().post("/v1/responses", json=body)
    assert reply.status_code == status
    error = _error(reply)
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", param, code)


def test_malformed_json_and_unknown_ids(service: Service) -> None:
    http = service.http()
    reply = http.post("/v1/responses", content=b"{not json", headers={"content-type": "application/json"})
    assert reply.status_code == 400 and _error(reply)["type"] == "invalid_request_error"
    for method in ("GET", "DELETE"):
        reply = http.request(method, "/v1/responses/resp_missing")
        assert reply.status_code == 404
        assert _error(reply)["param"] == "response_id"
    assert http.get("/v1/responses/resp_missing/input_items").status_code == 404


def test_unreachable_backend_is_a_clear_502(migrated_urls: dict[str, str]) -> None:
    from tests.conftest import start_service

    service = start_service(
        migrated_urls["sqlite"],
        f"http://127.0.0.1:{free_port()}",
        backend_retry_attempts=2,
        backend_retry_deadline=1.0,
    )
    try:
        reply = service.http().post("/v1/responses", json={"model": MODEL, "input": "x"})
    finally:
        service.server.stop()
    assert reply.status_code == 502
    error = _error(reply)
    assert error["type"] == "server_error" and "unreachable" in error["message"]


def test_health_and_readiness(service: Service) -> None:
    assert service.http().get("/healthz").json() == {"status": "ok"}
    ready = service.http().get("/readyz")
    assert ready.status_code == 200 and ready.json()["database"] == head_revision()


async def test_concurrent_burst_loses_nothing(service: Service) -> None:
    client = openai.AsyncOpenAI(base_url=f"{service.url}/v1", api_key=service.api_key, max_retries=0)

    async def conversation(index: int) -> tuple[str, str]:
        first = await client.responses.create(model=MODEL, input=f"conversation {index}")
        second = await client.responses.create(model=MODEL, input="and then?", previous_response_id=first.id)
        return first.id, second.id

    pairs = await asyncio.gather(*(conversation(i) for i in range(25)))
    assert len({rid for pair in pairs for rid in pair}) == 50
    for first_id, second_id in pairs:
        fetched = await client.responses.retrieve(second_id)
        assert fetched.previous_response_id == first_id and fetched.status == "completed"
    await client.close()


def test_request_size_and_item_limits(service_factory: Any) -> None:
    small: Service = service_factory("postgres", max_request_bytes=2048, max_input_items=3)
    http = small.http()
    big = http.post("/v1/responses", json={"model": MODEL, "input": "x" * 4096})
    assert big.status_code == 413 and _error(big)["code"] == "request_too_large"
    many = http.post("/v1/responses", json={"model": MODEL, "input": [{"role": "user", "content": "x"}] * 4})
    assert many.status_code == 400 and (_error(many)["param"], _error(many)["code"]) == (
        "input",
        "too_many_items",
    )


def test_usage_maps_cached_and_cache_write_tokens(service: Service) -> None:
    client = service.openai()
    question = f"A long question about prefix caches, asked twice {uuid.uuid4().hex}. " * 20
    first = client.responses.create(model=MODEL, input=question, max_output_tokens=16)
    assert first.usage is not None
    prompt = first.usage.input_tokens
    details = first.usage.input_tokens_details
    assert (details.cached_tokens, details.cache_write_tokens) == (0, prompt // 16 * 16)
    with client.responses.stream(model=MODEL, input=question) as stream:
        again = stream.get_final_response()
    assert again.usage is not None
    assert again.usage.input_tokens_details.cached_tokens == (prompt - 1) // 16 * 16
