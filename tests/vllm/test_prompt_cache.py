"""The cache-reference path on a real vLLM with the convstate-vllm plugin, through the service in
`cache_ref` mode with the official openai SDK.

For every hit turn the prompt vLLM generated from (its own `prompt_token_ids`) is vLLM's `/tokenize`
render of the stored history, the canary (at fraction 1.0) finds every handle equal to a full render,
greedy outputs equal those of `full` mode, and the bytes sent per turn stay flat while the history
grows. Every typed miss (provoked by changing one request or reply on its way) is recovered inside the
same request, a foreign salt is refused, and so is every handle after a vLLM restart."""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from openai.types.responses import ResponseCompletedEvent, ResponseIncompleteEvent
from sqlalchemy.ext.asyncio import AsyncEngine

from service.backends.client import BackendClient, BackendMiss
from service.config import Settings
from service.domain.prefix import token_digest
from tests.conftest import Service
from tests.vllm.conftest import WEATHER, Vllm, canary_render
from tests.vllm.recorder import Exchange, Recorder

pytestmark = pytest.mark.vllm

SHORT = 16
INSTRUCTIONS = "You are terse."
# Equal lengths: a hit turn's body differs from the next one's only in these and the handle.
QUESTIONS = [f"Question {n}: name one colour of the sea at dusk, in one word." for n in range(1, 7)]
HIT = "cache_ref; reason=hit"
CANARY = "cache_ref; reason=canary"


def _canary_counts(service: Service) -> dict[str, float]:
    text = service.http().get("/metrics").text
    found = re.findall(r'^convstate_canary_checks_total\{result="(\w+)"\} ([0-9.e+]+)$', text, re.MULTILINE)
    return {result: float(value) for result, value in found}


def _wait_for_canary(service: Service, before: dict[str, float], checks: int) -> dict[str, float]:
    """The canary runs after the response; wait (at most 30 s) for `checks` more of them."""
    deadline = time.monotonic() + 30
    while True:
        now = _canary_counts(service)
        done = sum(now.values()) - sum(before.values())
        if done >= checks or time.monotonic() > deadline:
            return {result: now.get(result, 0) - before.get(result, 0) for result in ("match", "mismatch")}
        time.sleep(0.2)


def _chat_exchanges(recorder: Recorder, since: int) -> list[Exchange]:
    return recorder.exchanges[since:]


async def _generated_from_render(
    engine: AsyncEngine, service: Service, exchange: Exchange, response_id: str, **where: Any
) -> None:
    """What vLLM generated from is vLLM's own full render of the stored history."""
    assert exchange.status == 200 and exchange.prompt_token_ids, exchange
    rendered = await canary_render(
        engine,
        service.settings,
        exchange,
        response_id,
        where.pop("instructions", None),
        through_reply=False,
        **where,
    )
    assert token_digest(rendered) == token_digest(exchange.prompt_token_ids)


Compared = tuple[Service, Service, dict[str, float]]


@pytest.fixture
def compared(vllm_service: Any) -> Compared:
    """The service in `cache_ref` mode with the canary on every hit, the service in `full` mode to compare
    its answers with, and the canary's counts before the test."""
    cached: Service = vllm_service("cache_ref", canary_fraction=1.0)
    return cached, vllm_service("full"), _canary_counts(cached)


async def test_a_chain_hits_renders_like_vllm_and_answers_like_full_mode(
    compared: Compared, vllm: Vllm, recorder: Recorder, pg_engine: AsyncEngine
) -> None:
    cached, plain, before = compared
    previous: dict[str, str | None] = {"cache_ref": None, "full": None}
    decisions, sent, answers = [], [], []
    for question in QUESTIONS:
        turn: dict[str, str] = {}
        for mode, service in (("full", plain), ("cache_ref", cached)):
            raw = service.openai().responses.with_raw_response.create(
                model=vllm.model,
                input=question,
                instructions=INSTRUCTIONS,
                previous_response_id=previous[mode],
                max_output_tokens=SHORT,
                temperature=0,
            )
            response = raw.parse()
            previous[mode] = response.id
            turn[mode] = response.output_text
            if mode == "cache_ref":
                decisions.append(raw.headers["x-convstate-decision"])
                exchange = recorder.exchanges[-1]
                sent.append(len(exchange.sent))
                assert raw.headers["x-convstate-prompt-digest"] == token_digest(
                    exchange.prompt_token_ids or []
                )
                await _generated_from_render(
                    pg_engine, cached, exchange, response.id, instructions=INSTRUCTIONS
                )
        answers.append(turn)
    assert decisions == ["full; reason=no_parent"] + [CANARY] * (len(QUESTIONS) - 1)
    assert all(turn["cache_ref"] == turn["full"] for turn in answers), answers
    # Only the new message and the handle travel: the same size every hit turn (within the digits of
    # the token count), while the history behind them grows.
    assert max(sent[1:]) - min(sent[1:]) <= 8, sent
    assert _wait_for_canary(cached, before, len(QUESTIONS) - 1) == {
        "match": len(QUESTIONS) - 1,
        "mismatch": 0,
    }


async def test_a_conversation_of_tool_calls_and_results(
    compared: Compared, vllm: Vllm, recorder: Recorder, pg_engine: AsyncEngine
) -> None:
    cached, plain, before = compared
    # A forced call, its result (answered with another forced call), then text turns; changing
    # tool_choice changes the tools part of the fingerprint, so that turn takes the full path.
    named = {"type": "function", "name": "get_weather"}
    inputs: list[dict[str, Any]] = [
        {"input": "What is the weather in Paris?", "tool_choice": named},
        {"input": "function_call_output", "tool_choice": named},
        {"input": "function_call_output", "tool_choice": named},
        {"input": "And should I take an umbrella?"},
        {"input": "Thanks. One word to describe Paris?"},
    ]
    outputs: dict[str, list[Any]] = {"full": [], "cache_ref": []}
    decisions = []
    for mode, service in (("full", plain), ("cache_ref", cached)):
        client = service.openai()
        conversation = client.conversations.create(
            items=[{"role": "developer", "content": "Answer briefly; use tools when asked."}]
        )
        for step in inputs:
            given: Any = step["input"]
            if given == "function_call_output":
                call = next(item for item in outputs[mode][-1] if item.type == "function_call")
                given = [{"type": "function_call_output", "call_id": call.call_id, "output": "Rain, 12 C"}]
            raw = client.responses.with_raw_response.create(
                model=vllm.model,
                conversation=conversation.id,
                input=given,
                tools=[WEATHER],
                tool_choice=step.get("tool_choice", "auto"),
                # A forced call's arguments are guided JSON, whitespace and all: room for it.
                max_output_tokens=128 if "tool_choice" in step else 24,
                temperature=0,
            )
            response = raw.parse()
            outputs[mode].append(response.output)
            if mode == "cache_ref":
                decisions.append(raw.headers["x-convstate-decision"])
                await _generated_from_render(
                    pg_engine, cached, recorder.exchanges[-1], response.id, conversation_id=conversation.id
                )
    assert decisions == ["full; reason=no_parent", CANARY, CANARY, "full; reason=tools_changed", CANARY]
    assert [item.type for item in outputs["cache_ref"][0]] == ["function_call"]

    def shape(output: list[Any]) -> list[tuple[str, str]]:
        return [
            (item.type, item.content[0].text if item.type == "message" else f"{item.name}{item.arguments}")
            for item in output
        ]

    assert [shape(o) for o in outputs["cache_ref"]] == [shape(o) for o in outputs["full"]]
    assert _wait_for_canary(cached, before, 3) == {"match": 3, "mismatch": 0}


async def test_streamed_turns_hit(
    vllm_service: Any, vllm: Vllm, recorder: Recorder, pg_engine: AsyncEngine
) -> None:
    cached: Service = vllm_service("cache_ref", canary_fraction=1.0)
    client = cached.openai()
    first = client.responses.create(model=vllm.model, input="Count to three.", max_output_tokens=SHORT)
    previous = first.id
    for question in ("Now count to five.", "Now backwards."):
        with client.responses.with_streaming_response.create(
            model=vllm.model,
            input=question,
            previous_response_id=previous,
            max_output_tokens=SHORT,
            stream=True,
        ) as raw:
            assert raw.headers["x-convstate-decision"] == CANARY
            last = list(raw.parse())[-1]
        assert isinstance(last, ResponseCompletedEvent | ResponseIncompleteEvent), last
        final = last.response
        assert final.output_text == client.responses.retrieve(final.id).output_text
        await _generated_from_render(pg_engine, cached, recorder.exchanges[-1], final.id)
        previous = final.id


def _tampered(field: str, value: Any) -> Callable[[dict[str, Any]], dict[str, Any]]:
    def tamper(body: dict[str, Any]) -> dict[str, Any]:
        if field in ("ref", "fingerprint", "prefix_hash", "tokens"):
            return {**body, "prompt_cache": {**body["prompt_cache"], field: value}}
        return {**body, field: value}

    return tamper


IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}


def _with_an_image(body: dict[str, Any]) -> dict[str, Any]:
    *earlier, last = body["messages"]
    return {**body, "messages": [*earlier, {**last, "content": [{"type": "text", "text": "hi"}, IMAGE]}]}


def _lasting(reply: dict[str, Any]) -> dict[str, Any]:
    """A reply whose handle the service will believe valid for an hour (its clock against vLLM's)."""
    return {**reply, "prompt_cache": {**reply["prompt_cache"], "expires_at": time.time() + 3600}}


def test_every_typed_miss_recovers_inside_the_request(
    vllm_service: Any, vllm: Vllm, recorder: Recorder
) -> None:
    """Each miss is provoked by changing one request (or, for expiry, one reply: a clock the service
    trusts further than vLLM's) on its way; the client sees an ordinary answer, the next turn hits.
    Without reseeding (test_reseed.py), a refused handle is resent in full."""
    client = vllm_service("cache_ref", reseed="render").openai()
    misses: list[tuple[str, Callable[[], None]]] = [
        ("unknown_ref", lambda: setattr(recorder, "tamper", _tampered("ref", "pc_" + "0" * 32))),
        ("fingerprint_mismatch", lambda: setattr(recorder, "tamper", _tampered("fingerprint", "0" * 32))),
        ("prefix_mismatch", lambda: setattr(recorder, "tamper", _tampered("prefix_hash", "0" * 32))),
        ("not_appendable", lambda: setattr(recorder, "tamper", _with_an_image)),
    ]
    previous = client.responses.create(model=vllm.model, input="Hello.", max_output_tokens=SHORT).id
    for code, provoke in misses:
        provoke()
        since = len(recorder.exchanges)
        raw = client.responses.with_raw_response.create(
            model=vllm.model,
            input=f"Provoke {code}.",
            previous_response_id=previous,
            max_output_tokens=SHORT,
        )
        assert raw.headers["x-convstate-decision"] == f"full; reason=backend_miss:{code}"
        exchanges = _chat_exchanges(recorder, since)
        assert [e.status for e in exchanges] == [409, 200]
        assert exchanges[0].error is not None and exchanges[0].error["code"] == code
        assert raw.parse().status in ("completed", "incomplete")
        hit = client.responses.with_raw_response.create(
            model=vllm.model, input="Go on.", previous_response_id=raw.parse().id, max_output_tokens=SHORT
        )
        assert hit.headers["x-convstate-decision"] == HIT
        previous = hit.parse().id
    # Expiry: the service is told the handle lives an hour, vLLM keeps it for its 30 s.
    recorder.skew = _lasting
    registered = client.responses.create(
        model=vllm.model, input="Remember this.", previous_response_id=previous, max_output_tokens=SHORT
    )
    ttl = float(
        httpx.get(f"{vllm.url}/v1/models", headers={"authorization": f"Bearer {vllm.api_key}"}).json()[
            "data"
        ][0]["prompt_cache"]["handle_ttl_seconds"]
    )
    time.sleep(ttl + 1)
    raw = client.responses.with_raw_response.create(
        model=vllm.model, input="Still there?", previous_response_id=registered.id, max_output_tokens=SHORT
    )
    assert raw.headers["x-convstate-decision"] == "full; reason=backend_miss:expired"


async def test_a_foreign_salt_is_refused(vllm: Vllm) -> None:
    client = BackendClient(Settings(backend_url=vllm.url, backend_api_key=vllm.api_key))
    messages = [{"role": "user", "content": f"Remember {uuid.uuid4().hex}."}]
    base = {"model": vllm.model, "max_tokens": 4, "temperature": 0}
    try:
        registered = await client.chat(
            {**base, "messages": messages, "cache_salt": "tenant-a", "prompt_cache": {"register": True}}
        )
        handle = registered.handle
        assert handle is not None and handle.covers_output
        reference = {
            "ref": handle.ref,
            "tokens": handle.safe_tokens,
            "prefix_hash": handle.prefix_hash,
            "fingerprint": handle.fingerprint,
        }
        follow = [{"role": "user", "content": "What did I ask you to remember?"}]
        with pytest.raises(BackendMiss) as refused:
            await client.chat(
                {**base, "messages": follow, "cache_salt": "tenant-b", "prompt_cache": reference}
            )
        assert refused.value.code == "unknown_ref"
        continued = await client.chat(
            {**base, "messages": follow, "cache_salt": "tenant-a", "prompt_cache": reference}
        )
        assert continued.prompt_digest is not None
    finally:
        await client.aclose()


def test_a_vllm_restart_refuses_every_earlier_handle(
    vllm_service: Any, vllm: Vllm, recorder: Recorder, restart_vllm: Callable[[], None]
) -> None:
    """A service that learns the new epoch decides the full path itself; one that still trusts the old
    answer sends the handle, which vLLM refuses. Either way the turn answers (in full: without
    reseeding, which test_reseed.py covers), and the next one hits."""
    fresh = vllm_service("cache_ref", reseed="render").openai()
    stale = vllm_service("cache_ref", reseed="render", backend_info_ttl=3600.0).openai()
    last = {}
    for name, client in (("fresh", fresh), ("stale", stale)):
        first = client.responses.create(model=vllm.model, input="Hello.", max_output_tokens=SHORT)
        # The restart outlasts the lane's 30 s handles: the service is told this one lives an hour, so
        # that only the epoch can stop it.
        recorder.skew = _lasting
        raw = client.responses.with_raw_response.create(
            model=vllm.model, input="Again.", previous_response_id=first.id, max_output_tokens=SHORT
        )
        assert raw.headers["x-convstate-decision"] == HIT
        last[name] = raw.parse().id
    restart_vllm()
    expected = {
        "fresh": "full; reason=backend_epoch_changed",
        "stale": "full; reason=backend_miss:unknown_ref",
    }
    for name, client in (("fresh", fresh), ("stale", stale)):
        raw = client.responses.with_raw_response.create(
            model=vllm.model,
            input="After the restart.",
            previous_response_id=last[name],
            max_output_tokens=SHORT,
        )
        assert raw.headers["x-convstate-decision"] == expected[name]
        hit = client.responses.with_raw_response.create(
            model=vllm.model,
            input="And again.",
            previous_response_id=raw.parse().id,
            max_output_tokens=SHORT,
        )
        assert hit.headers["x-convstate-decision"] == HIT
