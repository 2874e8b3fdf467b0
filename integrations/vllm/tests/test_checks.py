"""The protocol's checks of a cache reference, in their order, on vLLM's real SmolLM2 renderer; and the
registry's bounds."""

from __future__ import annotations

from typing import Any

import pytest

from convstate_vllm.cache import PromptCache, reply_message
from convstate_vllm.handles import Registry
from convstate_vllm.protocol import BadPromptCache, CacheRequest, Miss, parse_cache_request
from plugin_support import MODEL, chat_request, prompt_cache, run

FIRST = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a color."}]
NEXT = [{"role": "user", "content": "Another one."}]
IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def handle_for(cache: PromptCache, salt: str = "salt-a") -> dict[str, Any]:
    request = chat_request(FIRST, cache_salt=salt)
    turn = run(cache.render_full(request))
    assert turn is not None
    handle = run(cache.register(turn, request, reply_message("Blue.", None, [])))
    assert handle is not None and handle["covers_output"]
    return handle


def reference(handle: dict[str, Any], **changes: Any) -> CacheRequest:
    fields = {
        "ref": handle["ref"],
        "tokens": handle["safe_tokens"],
        "prefix_hash": handle["prefix_hash"],
        "fingerprint": handle["fingerprint"],
        "register": True,
    }
    return CacheRequest(**{**fields, **changes})


def miss(cache: PromptCache, cache_request: CacheRequest, messages: Any = None, **fields: Any) -> str:
    request = chat_request(messages or NEXT, **{"cache_salt": "salt-a", **fields})
    with pytest.raises(Miss) as refused:
        run(cache.continue_from(request, cache_request))
    return refused.value.code


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def cache(online: Any, clock: Clock) -> PromptCache:
    return prompt_cache(online("smollm2"), Registry(capacity=2, ttl=60.0, clock=clock))


def test_each_check_in_order(cache: PromptCache, clock: Clock) -> None:
    handle = handle_for(cache)
    wrong = {"fingerprint": "other", "prefix_hash": "other"}
    assert miss(cache, reference(handle, ref="pc_unknown", **wrong)) == "unknown_ref"
    assert miss(cache, reference(handle, **wrong), cache_salt="salt-b") == "unknown_ref"
    assert miss(cache, reference(handle, **wrong)) == "fingerprint_mismatch"
    assert miss(cache, reference(handle, tokens=handle["safe_tokens"] + 1), echo=True) == "prefix_mismatch"
    assert miss(cache, reference(handle, prefix_hash="0" * 32)) == "prefix_mismatch"
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    assert miss(cache, reference(handle), tools=tools, tool_choice="none") == "prefix_mismatch"
    assert miss(cache, reference(handle), model=MODEL + "-other") == "fingerprint_mismatch"
    assert miss(cache, reference(handle), echo=True) == "not_appendable"
    assert miss(cache, reference(handle), [{"role": "user", "content": [IMAGE]}]) == "not_appendable"
    # None of the misses changed the handle: it still continues.
    turn = run(cache.continue_from(chat_request(NEXT, cache_salt="salt-a"), reference(handle)))
    assert turn.base is not None and turn.ids[: handle["safe_tokens"]] == turn.base.token_ids()
    clock.now += 61
    assert miss(cache, reference(handle, **wrong)) == "expired"
    assert miss(cache, reference(handle)) == "unknown_ref"  # an expired handle is dropped


def test_the_least_recently_used_handle_goes_first(cache: PromptCache) -> None:
    first, second = handle_for(cache), handle_for(cache)
    run(cache.continue_from(chat_request(NEXT, cache_salt="salt-a"), reference(first)))
    handle_for(cache)  # a third handle: capacity is 2
    assert miss(cache, reference(second)) == "unknown_ref"
    run(cache.continue_from(chat_request(NEXT, cache_salt="salt-a"), reference(first)))


def test_every_process_has_its_own_epoch() -> None:
    assert Registry(1, 1.0).epoch != Registry(1, 1.0).epoch


@pytest.mark.parametrize(
    "raw",
    [
        "ref",
        {"ref": 5},
        {"ref": "pc_x", "tokens": 3, "prefix_hash": "h"},
        {"tokens": True},
        {"register": "yes"},
    ],
)
def test_malformed_prompt_cache_objects(raw: Any) -> None:
    with pytest.raises(BadPromptCache):
        parse_cache_request(raw)
