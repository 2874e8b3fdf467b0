"""Reseeding on a real vLLM with the convstate-vllm plugin (CONVSTATE_RESEED=artifact): after vLLM is
restarted, every handle is gone, and the next turn rebuilds its parent's prefix from the token ids vLLM
reported for the parent (`prompt_cache.seed`) instead of sending and rendering the whole history."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from service.domain.prefix import token_digest
from tests.conftest import Service, wait_for_artifact
from tests.vllm.conftest import Vllm, canary_render
from tests.vllm.recorder import Recorder

pytestmark = pytest.mark.vllm

QUESTIONS = ("Name a fruit.", "Name another one.")
AFTER = "Which of the two is sweeter?"
# Room for SmolLM2 to end its answers; a story cut at CUT tokens (the least the API takes) does not end
# its message.
ROOM, CUT = 96, 16
STORY = "Tell me a long story about a lighthouse keeper."


@pytest.fixture
def services(vllm_service: Any) -> tuple[Service, Service]:
    """The service reseeding from stored ids, and one in `full` mode to compare its answers with (made
    outside the test's event loop: a service's first start provisions its tenant with its own)."""
    return vllm_service("cache_ref", reseed="artifact"), vllm_service("full")


async def test_after_a_restart_a_turn_is_reseeded_from_its_parents_ids(
    services: tuple[Service, Service],
    vllm: Vllm,
    recorder: Recorder,
    pg_engine: AsyncEngine,
    restart_vllm: Callable[[], None],
) -> None:
    reseeding, plain = services
    lineages = {"reseeded": (reseeding, ROOM), "full": (plain, ROOM), "cut": (reseeding, CUT)}
    last: dict[str, str | None] = dict.fromkeys(lineages)

    def turn(name: str, text: str) -> tuple[str, str]:
        service, limit = lineages[name]
        raw = service.openai().responses.with_raw_response.create(
            model=vllm.model,
            input=text,
            previous_response_id=last[name],
            max_output_tokens=limit,
            temperature=0,
        )
        response = raw.parse()
        last[name] = response.id
        return response.output_text, raw.headers["x-convstate-decision"]

    for question in QUESTIONS:
        turn("reseeded", question)
        turn("full", question)
    turn("cut", STORY)
    admin = reseeding.admin()
    parent = wait_for_artifact(admin, last["reseeded"] or "", seconds=60)
    wait_for_artifact(admin, last["cut"] or "", seconds=60)
    assert recorder.exchanges[-1].output_token_ids and len(recorder.exchanges[-1].output_token_ids) == CUT
    restart_vllm()

    since = len(recorder.exchanges)
    answer, decision = turn("reseeded", AFTER)
    assert decision == "cache_ref; reason=reseed:backend_epoch_changed"
    [exchange] = recorder.exchanges[since:]
    seed = exchange.body["prompt_cache"]["seed"]
    assert seed["covers_output"] and seed["prompt_token_ids"] == parent["prompt_token_ids"]
    assert seed["output_token_ids"] == parent["output_token_ids"]
    assert [m["content"] for m in exchange.body["messages"]] == [AFTER]
    # vLLM took the parent's prompt (less its generation prompt) as it was, and says so.
    assert exchange.status == 200 and exchange.prompt_cache and exchange.prompt_token_ids
    reused = exchange.prompt_cache["reused_tokens"]
    assert 0 < len(parent["prompt_token_ids"]) - reused <= 8
    assert exchange.prompt_token_ids[:reused] == parent["prompt_token_ids"][:reused]
    # What vLLM generated from is its own full render of the stored history, and the greedy answer is
    # the full path's.
    rendered = await canary_render(
        pg_engine, reseeding.settings, exchange, last["reseeded"] or "", None, through_reply=False
    )
    assert token_digest(rendered) == token_digest(exchange.prompt_token_ids)
    assert answer == turn("full", AFTER)[0]
    # The handle registered on the seeded prefix serves the next turn.
    assert turn("reseeded", "And the least sweet?")[1] == "cache_ref; reason=hit"

    # A parent whose reply was cut is refused as a seed: the turn goes the full way.
    since = len(recorder.exchanges)
    assert turn("cut", AFTER)[1] == "full; reason=backend_epoch_changed"
    refused, sent = recorder.exchanges[since:]
    assert "seed" in refused.body["prompt_cache"] and refused.status == 409
    assert refused.error is not None and refused.error["code"] == "not_appendable"
    assert sent.status == 200 and "seed" not in (sent.body.get("prompt_cache") or {})
