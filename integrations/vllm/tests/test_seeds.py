"""Seeds (`prompt_cache.seed`) on vLLM's real SmolLM2 renderer: a seeded turn's prompt is vLLM's full
render of the conversation, and so is every turn after it on the handles made from it; what the
template would not keep is refused with the protocol's codes, and malformed seeds are 400s."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from convstate_vllm.cache import PromptCache, Turn, reply_message
from convstate_vllm.protocol import BadPromptCache, CacheRequest, Miss, Seed, parse_cache_request
from plugin_support import MODEL, chat_request, prompt_cache, run, vllm_prompt

FIRST = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a color."}]
REPLY = reply_message("Blue.", None, [])
NEXT = [{"role": "user", "content": "Another one."}]
FINGERPRINT = "fp-" + MODEL


def first_turn(cache: PromptCache, text: str = "Blue.") -> tuple[list[int], list[int]]:
    """The ids of a first turn as vLLM reports them: its prompt, and an output that ends its message."""
    turn = run(cache.render_full(chat_request(FIRST)))
    assert turn is not None
    tokenizer = cache.renderer.tokenizer
    return turn.ids, [*tokenizer.encode(text, add_special_tokens=False), tokenizer.eos_token_id]


def seeded(
    prompt: list[int], output: list[int], *, covers_output: bool = True, **changes: Any
) -> CacheRequest:
    fields: dict[str, Any] = {"ref": None, "tokens": None, "prefix_hash": None, "fingerprint": FINGERPRINT}
    return CacheRequest(**{**fields, **changes}, register=True, seed=Seed(prompt, output, covers_output))


def miss(cache: PromptCache, cache_request: CacheRequest, messages: Any = NEXT, **fields: Any) -> str:
    with pytest.raises(Miss) as refused:
        run(cache.continue_from(chat_request(copy.deepcopy(messages), **fields), cache_request))
    return refused.value.code


@pytest.fixture
def cache(online: Any) -> PromptCache:
    return prompt_cache(online("smollm2"))


@pytest.mark.parametrize("covers_output", [True, False])
def test_a_seeded_turn_and_the_next_are_full_renders(
    cache: PromptCache, online: Any, covers_output: bool
) -> None:
    prompt, output = first_turn(cache)
    # Without covers_output the caller sends the reply again, before the new messages.
    sent = NEXT if covers_output else [REPLY, *NEXT]
    request = chat_request(copy.deepcopy(sent))
    turn: Turn = run(cache.continue_from(request, seeded(prompt, output, covers_output=covers_output)))
    history = [*FIRST, REPLY, *NEXT]
    assert turn.ids == vllm_prompt(online("smollm2"), history)
    # The seeded prompt less its generation prompt is taken as it is, and reported as reused.
    assert turn.base is not None and turn.ids[: turn.base.count] == prompt[: turn.base.count]
    generation = cache.renderer.tokenizer.encode("<|im_start|>assistant\n", add_special_tokens=False)
    assert turn.base.count == len(prompt) - len(generation)
    handle = run(cache.register(turn, request, reply_message("Green.", None, [])))
    assert handle is not None and handle["covers_output"] and handle["reused_tokens"] == turn.base.count
    history = [*history, reply_message("Green.", None, [])]
    entry = cache.registry.get(handle["ref"])
    assert entry is not None and entry.prefix.token_ids() == vllm_prompt(
        online("smollm2"), history, add_generation_prompt=False
    )
    # The handle made on the seed continues like any other.
    reference = CacheRequest(handle["ref"], handle["safe_tokens"], handle["prefix_hash"], FINGERPRINT, True)
    later = [{"role": "user", "content": "And a third?"}]
    continued = run(cache.continue_from(chat_request(copy.deepcopy(later)), reference))
    assert continued.ids == vllm_prompt(online("smollm2"), [*history, *later])


def test_each_seed_check(cache: PromptCache) -> None:
    prompt, output = first_turn(cache)
    assert miss(cache, seeded(prompt, output, fingerprint="other")) == "fingerprint_mismatch"
    assert miss(cache, seeded(prompt, output), model=MODEL + "-other") == "fingerprint_mismatch"
    with pytest.raises(BadPromptCache, match="vocabulary"):
        run(cache.continue_from(chat_request(NEXT), seeded(prompt, [*output, 10**9])))
    assert miss(cache, seeded(prompt, output), echo=True) == "not_appendable"
    assert miss(cache, seeded(prompt, output), []) == "not_appendable"
    # A prompt cut before its generation prompt's end, an output cut before the end of its message.
    assert miss(cache, seeded(prompt[:-1], output)) == "not_appendable"
    assert miss(cache, seeded(prompt, output[:-1])) == "not_appendable"
    # The reply of a forced tool call is the call vLLM made of the output, not its text.
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    assert miss(cache, seeded(prompt, output), tools=tools, tool_choice="required") == "not_appendable"
    # None of them is a reason to refuse the seed itself.
    assert run(cache.continue_from(chat_request(NEXT), seeded(prompt, output))).base is not None


def test_a_template_that_drops_reasoning_refuses_a_seeded_reply_with_it(online: Any) -> None:
    cache = prompt_cache(online("drops_reasoning"))
    prompt, output = first_turn(cache, "<think>Short.</think>Blue.")
    assert miss(cache, seeded(prompt, output)) == "not_appendable"
    # The reply sent again (the handle for that turn would not have covered it) is rendered as the
    # template renders it.
    reply = reply_message("<think>Short.</think>Blue.", None, [])
    turn = run(cache.continue_from(chat_request([reply, *NEXT]), seeded(prompt, output, covers_output=False)))
    assert turn.ids == vllm_prompt(online("drops_reasoning"), [*FIRST, reply, *NEXT])


@pytest.mark.parametrize(
    "raw",
    [
        {"seed": {"prompt_token_ids": [1], "output_token_ids": [2], "covers_output": True}},
        {"seed": {"prompt_token_ids": [1], "output_token_ids": [2]}, "fingerprint": "f"},
        {
            "seed": {"prompt_token_ids": [1, "2"], "output_token_ids": [], "covers_output": True},
            "fingerprint": "f",
        },
        {
            "seed": {"prompt_token_ids": [True], "output_token_ids": [], "covers_output": True},
            "fingerprint": "f",
        },
        {"seed": {"output_token_ids": [], "covers_output": False}, "fingerprint": "f"},
        {"seed": [1, 2], "fingerprint": "f"},
        {
            "seed": {"prompt_token_ids": [1], "output_token_ids": [], "covers_output": True},
            "ref": "pc_x",
            "tokens": 1,
            "prefix_hash": "h",
            "fingerprint": "f",
        },
    ],
)
def test_malformed_seeds(raw: Any) -> None:
    with pytest.raises(BadPromptCache):
        parse_cache_request(raw)
