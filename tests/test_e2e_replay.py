"""The caching proxy over real HTTP, driven with the openai SDK as a harness drives it: chat completions and
completions forwarded with the tenant's salt, hits answered from the replay cache with a new id and every
prompt token cached, streamed hits replayed, single flight within a service, nothing cached from a failed
call, nondeterministic requests refused unless forced, and a model reload emptying its entries."""

from __future__ import annotations

import asyncio
import re
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from service.backends.reference.config import ReferenceSettings
from service.backends.reference.server import create_app as create_reference_app
from service.serving import ServerThread
from service.store.models import ReplayEntry
from tests.conftest import Service, new_tenant, start_service

MODEL = "ref-chatml"
USE = {"x-convstate-cache": "use"}


@pytest.fixture(scope="module")
def backend() -> Iterator[ServerThread]:
    """This module's own reference backend: its counters and reloads touch no other test."""
    with ServerThread(create_reference_app(ReferenceSettings())) as server:
        yield server


@pytest.fixture(scope="module")
def replay_service(migrated_urls: dict[str, str], backend: ServerThread) -> Iterator[Service]:
    service = start_service(migrated_urls["postgres"], backend.url, replay_wait_seconds=20)
    yield service
    service.server.stop()


def backend_calls(backend: ServerThread) -> int:
    calls: int = httpx.get(backend.url + "/stats").json()["requests"]
    return calls


def counted(service: Service) -> dict[str, float]:
    """The replay cache's chat completions counts by result (/metrics)."""
    text = httpx.get(service.url + "/metrics").text
    pattern = r'convstate_replay_requests_total\{endpoint="chat.completions",result="(\w+)"\} (\S+)'
    return {result: float(value) for result, value in re.findall(pattern, text)}


def added(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {
        result: value - before.get(result, 0.0)
        for result, value in after.items()
        if value != before.get(result)
    }


def question() -> list[ChatCompletionMessageParam]:
    return [{"role": "user", "content": f"What is {uuid.uuid4().hex}?"}]


def chat(client: openai.OpenAI, messages: list[ChatCompletionMessageParam], **extra: Any) -> Any:
    settings = {"temperature": 0, "max_tokens": 24, "extra_headers": USE, **extra}
    return client.chat.completions.with_raw_response.create(model=MODEL, messages=messages, **settings)


def test_second_identical_request_is_a_hit(replay_service: Service, backend: ServerThread) -> None:
    client = replay_service.openai()
    messages = question()
    before = backend_calls(backend)
    first = chat(client, messages)
    second = chat(client, messages, user="someone-else", metadata=None)
    assert backend_calls(backend) == before + 1
    assert first.headers["x-convstate-cache"] == "miss" and second.headers["x-convstate-cache"] == "hit"
    assert first.headers["x-convstate-cache-key"] == second.headers["x-convstate-cache-key"]
    miss, hit = first.parse(), second.parse()
    assert hit.id != miss.id and hit.id.startswith("chatcmpl-")
    assert hit.choices[0].message.content == miss.choices[0].message.content
    assert hit.usage is not None and hit.usage.prompt_tokens_details is not None
    assert hit.usage.prompt_tokens_details.cached_tokens == hit.usage.prompt_tokens > 0


def test_tenants_do_not_share_entries(replay_service: Service, backend: ServerThread) -> None:
    messages = question()
    chat(replay_service.openai(), messages)
    other = new_tenant(replay_service.settings.database_url)
    reply = chat(replay_service.openai(other.user_key), messages)
    assert reply.headers["x-convstate-cache"] == "miss"


def test_a_sampling_change_is_a_miss(replay_service: Service, backend: ServerThread) -> None:
    client = replay_service.openai()
    messages = question()
    chat(client, messages)
    before = backend_calls(backend)
    assert chat(client, messages, max_tokens=25).headers["x-convstate-cache"] == "miss"
    assert chat(client, messages, seed=7).headers["x-convstate-cache"] == "miss"
    assert backend_calls(backend) == before + 2


def test_streamed_hit_replays_the_stored_content(replay_service: Service, backend: ServerThread) -> None:
    client = replay_service.openai()
    messages = question()
    counts = counted(replay_service)
    whole = chat(client, messages).parse()
    before = backend_calls(backend)
    with client.chat.completions.with_streaming_response.create(
        model=MODEL,
        messages=messages,
        temperature=0,
        max_tokens=24,
        stream=True,
        stream_options={"include_usage": True},
        extra_headers=USE,
    ) as streamed:
        assert streamed.headers["x-convstate-cache"] == "hit"
        chunks = list(streamed.parse())
    assert backend_calls(backend) == before
    assert (
        "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        == whole.choices[0].message.content
    )
    assert {c.id for c in chunks} != {whole.id} and len({c.id for c in chunks}) == 1
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    assert added(counts, counted(replay_service)) == {"miss": 1, "hit": 1}


def test_streamed_miss_is_stored_whole(replay_service: Service, backend: ServerThread) -> None:
    client = replay_service.openai()
    messages = question()
    counts = counted(replay_service)
    before = backend_calls(backend)
    stream = client.chat.completions.create(
        model=MODEL, messages=messages, temperature=0, max_tokens=24, stream=True, extra_headers=USE
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert all(c.usage is None for c in chunks)  # the client asked for no usage; the backend gave it to us
    whole = chat(client, messages)
    assert whole.headers["x-convstate-cache"] == "hit" and backend_calls(backend) == before + 1
    reply = whole.parse()
    assert (
        reply.choices[0].message.content == text and reply.usage is not None and reply.usage.total_tokens > 0
    )
    assert added(counts, counted(replay_service)) == {"miss": 1, "hit": 1}


def test_completions_are_cached_too(replay_service: Service, backend: ServerThread) -> None:
    client = replay_service.openai()
    prompt = f"Once upon a time {uuid.uuid4().hex}"
    before = backend_calls(backend)
    replies = [
        client.completions.with_raw_response.create(
            model=MODEL, prompt=prompt, temperature=0, max_tokens=12, extra_headers=USE
        )
        for _ in range(2)
    ]
    assert [r.headers["x-convstate-cache"] for r in replies] == ["miss", "hit"]
    assert backend_calls(backend) == before + 1
    first, second = (r.parse() for r in replies)
    assert first.choices[0].text == second.choices[0].text and second.id.startswith("cmpl-")
    stream = client.completions.create(
        model=MODEL, prompt=prompt, temperature=0, max_tokens=12, stream=True, extra_headers=USE
    )
    assert "".join(c.choices[0].text for c in stream if c.choices) == first.choices[0].text
    assert backend_calls(backend) == before + 1


def test_bypass_refresh_and_the_tenant_default(replay_service: Service, backend: ServerThread) -> None:
    client = replay_service.openai()
    messages = question()
    before = backend_calls(backend)
    plain = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=messages, temperature=0, max_tokens=24
    )
    assert plain.headers["x-convstate-cache"] == "bypass"  # the tenant has not opted in
    chat(client, messages)
    bypass = client.chat.completions.with_raw_response.create(
        model=MODEL,
        messages=messages,
        temperature=0,
        max_tokens=24,
        extra_headers={"x-convstate-cache": "bypass"},
    )
    assert bypass.headers["x-convstate-cache"] == "bypass"
    refresh = client.chat.completions.with_raw_response.create(
        model=MODEL,
        messages=messages,
        temperature=0,
        max_tokens=24,
        extra_body={"convstate_cache": "refresh"},
    )
    assert refresh.headers["x-convstate-cache"] == "refresh"
    assert chat(client, messages).headers["x-convstate-cache"] == "hit"
    assert backend_calls(backend) == before + 4


def test_nondeterministic_requests_are_cached_only_when_forced(
    replay_service: Service, backend: ServerThread
) -> None:
    client = replay_service.openai()
    messages = question()
    before = backend_calls(backend)
    for _ in range(2):
        sampled = client.chat.completions.with_raw_response.create(
            model=MODEL, messages=messages, temperature=0.7, max_tokens=24, extra_headers=USE
        )
        assert sampled.headers["x-convstate-cache"] == "uncacheable"
    forced = [
        client.chat.completions.with_raw_response.create(
            model=MODEL,
            messages=messages,
            temperature=0.7,
            max_tokens=24,
            extra_body={"convstate_cache": {"mode": "use", "force": True}},
        )
        for _ in range(2)
    ]
    assert [r.headers["x-convstate-cache"] for r in forced] == ["miss", "hit"]
    assert backend_calls(backend) == before + 3


async def test_a_failed_call_is_not_cached(
    replay_service: Service, backend: ServerThread, pg_engine: AsyncEngine
) -> None:
    client = replay_service.openai()
    messages = question()
    httpx.post(backend.url + "/admin/fail", json={"count": 1, "status": 500})
    with pytest.raises(openai.APIStatusError) as failed:
        chat(client, messages)
    assert failed.value.status_code == 502
    assert "127.0.0.1" not in failed.value.response.text  # no internal address reaches the client
    # The claim was given up at once: nothing is left, and the next request asks the backend.
    async with pg_engine.connect() as conn:
        left = select(ReplayEntry.key).where(
            ReplayEntry.tenant == replay_service.tenant, ReplayEntry.status == "pending"
        )
        assert (await conn.execute(left)).all() == []
    assert chat(client, messages).headers["x-convstate-cache"] == "miss"
    assert chat(client, messages).headers["x-convstate-cache"] == "hit"


def test_concurrent_identical_requests_make_one_backend_call(
    replay_service: Service, backend: ServerThread
) -> None:
    messages = question()
    httpx.post(backend.url + "/admin/latency", json={"ms": 300})
    before = backend_calls(backend)
    results: list[str] = []
    try:

        def one() -> None:
            with replay_service.http() as http:
                reply = http.post(
                    "/v1/chat/completions",
                    json={"model": MODEL, "messages": messages, "temperature": 0, "max_tokens": 24},
                    headers=USE,
                )
                reply.raise_for_status()
                results.append(reply.json()["choices"][0]["message"]["content"])

        threads = [threading.Thread(target=one) for _ in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        httpx.post(backend.url + "/admin/latency", json={"ms": 0})
    assert len(results) == 16 and len(set(results)) == 1
    assert backend_calls(backend) == before + 1


async def test_a_model_reload_empties_its_entries(
    replay_service: Service, backend: ServerThread, pg_engine: AsyncEngine
) -> None:
    client = replay_service.openai()
    messages = question()
    key = chat(client, messages).headers["x-convstate-cache-key"]
    assert await stored_keys(pg_engine, [key]) == {key}
    httpx.post(backend.url + "/admin/reload", json={"model": MODEL, "parts": {"revision": uuid.uuid4().hex}})
    # The next request of the model, once the service's model-card cache lapses, sees the new fingerprint
    # and removes what was made under the old one: no admin call.
    await asyncio.sleep(replay_service.settings.backend_info_ttl + 0.1)
    other = chat(client, question()).headers["x-convstate-cache-key"]
    assert await stored_keys(pg_engine, [key, other]) == {other}
    assert chat(client, messages).headers["x-convstate-cache"] == "miss"


async def stored_keys(engine: AsyncEngine, keys: list[str]) -> set[str]:
    async with engine.connect() as conn:
        return {
            row.key for row in await conn.execute(select(ReplayEntry.key).where(ReplayEntry.key.in_(keys)))
        }


def test_a_responses_turn_goes_through_the_cache(replay_service: Service, backend: ServerThread) -> None:
    client = replay_service.openai()
    question = f"Responses {uuid.uuid4().hex}"
    before = backend_calls(backend)
    turns = [
        client.responses.with_raw_response.create(
            model=MODEL, input=question, instructions="Be brief.", temperature=0, extra_headers=USE
        )
        for _ in range(2)
    ]
    assert [turn.headers["x-convstate-cache"] for turn in turns] == ["miss", "hit"]
    assert backend_calls(backend) == before + 1
    first, second = (turn.parse() for turn in turns)
    assert second.id != first.id and second.output_text == first.output_text
    assert (
        second.usage is not None
        and second.usage.input_tokens_details.cached_tokens == second.usage.input_tokens
    )
    # Its entry exports and imports back like any other.
    admin = replay_service.admin()
    page = admin.replay_entries(replay_service.tenant, whole=True, limit=1000)["data"]
    (entry,) = [
        row
        for row in page
        if row["endpoint"] == "responses" and row["result"]["content"] == first.output_text
    ]
    assert admin.replay_import([entry])["imported"] == 1
    # The replayed turn is stored like any other: retrievable, and a parent (in full: it holds no handle).
    assert client.responses.retrieve(second.id).output_text == first.output_text
    child = client.responses.with_raw_response.create(
        model=MODEL, input="And then?", previous_response_id=second.id, temperature=0
    )
    assert child.parse().status == "completed" and "x-convstate-cache" not in child.headers


def test_a_responses_turn_keys_on_its_history(replay_service: Service, backend: ServerThread) -> None:
    """The same input after two different histories is two entries."""
    client = replay_service.openai()
    parents = [
        client.responses.create(model=MODEL, input=f"History {uuid.uuid4().hex}", temperature=0)
        for _ in range(2)
    ]
    answers = [
        client.responses.with_raw_response.create(
            model=MODEL,
            input="Same question",
            previous_response_id=parent.id,
            temperature=0,
            extra_headers=USE,
        ).headers["x-convstate-cache"]
        for parent in parents
    ]
    assert answers == ["miss", "miss"]


def test_sampled_and_streamed_responses_turns_are_not_cached(replay_service: Service) -> None:
    client = replay_service.openai()
    sampled = client.responses.with_raw_response.create(
        model=MODEL, input=f"Sampled {uuid.uuid4().hex}", temperature=0.9, extra_headers=USE
    )
    assert sampled.headers["x-convstate-cache"] == "uncacheable"
    with client.responses.with_streaming_response.create(
        model=MODEL, input=f"Streamed {uuid.uuid4().hex}", temperature=0, stream=True, extra_headers=USE
    ) as streamed:
        assert "x-convstate-cache" not in streamed.headers
