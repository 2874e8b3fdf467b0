"""Turns through the service against a real vLLM (SmolLM2-135M-Instruct on CPU), with the official
openai SDK: chains, conversations, streaming, a forced tool call, usage, and the canary's render checked
against the token ids vLLM generated from."""

from __future__ import annotations

import json
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.conftest import Service
from tests.vllm.conftest import WEATHER, Vllm, canary_render
from tests.vllm.recorder import Exchange, Recorder

pytestmark = pytest.mark.vllm

MODES = ["full", "affinity"]
SHORT = 24  # output tokens per turn: enough to answer, cheap on two cores


def _decisions(mode: str, turns: int) -> list[str]:
    """The plugin issues a handle for every turn, so after the first one `cache_ref` uses it. `affinity`
    routes on llm-d's session token, which a vLLM without llm-d in front never sets: its turns go in
    full (with the lineage's x-session-id)."""
    if mode == "full":
        return ["full; reason=mode_full"] * turns
    if mode == "affinity":
        return ["full; reason=no_parent"] + ["full; reason=no_session_token"] * (turns - 1)
    return ["full; reason=no_parent"] + [f"{mode}; reason=hit"] * (turns - 1)


def _last(recorder: Recorder) -> Exchange:
    exchange = recorder.exchanges[-1]
    assert exchange.status == 200 and exchange.prompt_token_ids, exchange
    return exchange


@pytest.mark.parametrize("mode", [*MODES, "cache_ref"])
async def test_chain_and_the_canary_render_of_every_turn(
    vllm_service: Any, vllm: Vllm, recorder: Recorder, pg_engine: AsyncEngine, mode: str
) -> None:
    service: Service = vllm_service(mode)
    client = service.openai()
    instructions = "You are terse."
    previous, decisions, prompts, renders = None, [], [], []
    for question in ("Name a color.", "Name another one.", "Which of the two is darker?"):
        raw = client.responses.with_raw_response.create(
            model=vllm.model,
            input=question,
            instructions=instructions,
            previous_response_id=previous,
            max_output_tokens=SHORT,
        )
        response = raw.parse()
        assert response.status in ("completed", "incomplete") and response.output_text
        decisions.append(raw.headers["x-convstate-decision"])
        exchange = _last(recorder)
        assert exchange.prompt_token_ids is not None
        # What the service sent is what was generated from: /tokenize of the stored history equals the
        # prompt token ids vLLM reports for the turn.
        generated_from = await canary_render(
            pg_engine, service.settings, exchange, response.id, instructions, through_reply=False
        )
        assert generated_from == exchange.prompt_token_ids
        prompts.append(exchange.prompt_token_ids)
        renders.append(
            await canary_render(
                pg_engine, service.settings, exchange, response.id, instructions, through_reply=True
            )
        )
        previous = response.id
    assert decisions == _decisions(mode, 3)
    # The canary's full render of a turn (through its reply) is where the next turn's prompt starts:
    # SmolLM2's template appends, so a handle at a turn's end would be safe.
    for render, following in zip(renders, prompts[1:], strict=False):
        assert following[: len(render)] == render


@pytest.mark.parametrize("mode", MODES)
def test_conversation_turns(vllm_service: Any, vllm: Vllm, mode: str) -> None:
    client = vllm_service(mode).openai()
    conversation = client.conversations.create(items=[{"role": "user", "content": "My name is Ada."}])
    first = client.responses.create(
        model=vllm.model, conversation=conversation.id, input="Say hello to me.", max_output_tokens=SHORT
    )
    second = client.responses.create(
        model=vllm.model, conversation=conversation.id, input="What is my name?", max_output_tokens=SHORT
    )
    assert first.output_text and second.output_text
    items = client.conversations.items.list(conversation.id, order="asc").data
    assert [item.type for item in items] == ["message"] * 5
    assert [item.role for item in items] == ["user", "user", "assistant", "user", "assistant"]


@pytest.mark.parametrize("mode", MODES)
def test_streaming(vllm_service: Any, vllm: Vllm, recorder: Recorder, mode: str) -> None:
    client = vllm_service(mode).openai()
    first = client.responses.create(model=vllm.model, input="Count to three.", max_output_tokens=SHORT)
    events = list(
        client.responses.create(
            model=vllm.model,
            input="Now count to five.",
            previous_response_id=first.id,
            max_output_tokens=SHORT,
            stream=True,
        )
    )
    types = [event.type for event in events]
    assert types[:2] == ["response.created", "response.in_progress"]
    assert types[-1] in ("response.completed", "response.incomplete")
    text = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    final = events[-1].response
    assert text and text == final.output_text == client.responses.retrieve(final.id).output_text
    assert _last(recorder).usage is not None
    assert final.usage is not None and final.usage.output_tokens == _last(recorder).usage["completion_tokens"]  # type: ignore[index]


@pytest.mark.parametrize(("mode", "stream"), [("full", False), ("affinity", False), ("full", True)])
def test_forced_tool_call_and_its_result(vllm_service: Any, vllm: Vllm, mode: str, stream: bool) -> None:
    client = vllm_service(mode).openai()
    call: dict[str, Any] = {
        "model": vllm.model,
        "input": "What is the weather in Paris?",
        "tools": [WEATHER],
        "tool_choice": {"type": "function", "name": "get_weather"},
        # Greedy, with room for the arguments: a cut-off call is no call.
        "temperature": 0,
        "max_output_tokens": 128,
    }
    if stream:
        events = list(client.responses.create(**call, stream=True))
        assert events[-1].type == "response.completed"
        call_turn = events[-1].response
        assert call_turn.output == client.responses.retrieve(call_turn.id).output
    else:
        call_turn = client.responses.create(**call)
    calls = [item for item in call_turn.output if item.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather"
    arguments = json.loads(calls[0].arguments)
    assert isinstance(arguments.get("city"), str)
    result = client.responses.create(
        model=vllm.model,
        previous_response_id=call_turn.id,
        input=[{"type": "function_call_output", "call_id": calls[0].call_id, "output": "Sunny, 21 C"}],
        tools=[WEATHER],
        max_output_tokens=SHORT,
    )
    assert result.status in ("completed", "incomplete")
    assert result.output and result.output[0].type in ("message", "function_call")


def test_usage_maps_vllms_figures(vllm_service: Any, vllm: Vllm, recorder: Recorder) -> None:
    client = vllm_service("full").openai()
    prefix = "Here is a long shared preamble about the history of lighthouses and their keepers. " * 40
    reported: list[dict[str, Any]] = []
    for question in ("Summarize it in one word.", "Summarize it in two words."):
        response = client.responses.create(model=vllm.model, input=prefix + question, max_output_tokens=16)
        vllm_usage = _last(recorder).usage
        assert response.usage is not None and vllm_usage is not None
        details = vllm_usage.get("prompt_tokens_details") or {}
        assert response.usage.input_tokens == vllm_usage["prompt_tokens"]
        assert response.usage.output_tokens == vllm_usage["completion_tokens"]
        assert response.usage.input_tokens_details.cached_tokens == (details.get("cached_tokens") or 0)
        assert response.usage.input_tokens_details.cache_write_tokens == (
            details.get("created_cache_tokens") or 0
        )
        reported.append(details)
    # The second turn shares the long prefix: vLLM's prefix cache served it.
    assert reported[1]["cached_tokens"] > 0
    assert "created_cache_tokens" in reported[0] and reported[0]["created_cache_tokens"] > 0
