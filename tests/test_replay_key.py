"""The replay cache's key, field by field: every field that can change the output changes the key, and the
fields that cannot do not split the cache; the model's identity is part of it; the policy a request asks
for is read from the header, the body extension and the tenant's default."""

from __future__ import annotations

import copy
from dataclasses import asdict, replace
from typing import Any

import pytest

from service.domain.fingerprint import BackendModelInfo
from service.domain.replay import (
    Endpoint,
    Mode,
    cache_policy,
    canonical_request,
    deterministic,
    replay_key,
    replayed,
    turn_body,
)
from service.errors import InvalidRequest

BACKEND = BackendModelInfo(
    model="m",
    revision="rev-1",
    tokenizer="tok-1",
    renderer="render-1",
    chat_template="template-1",
    lora="none",
    block_size=16,
    epoch="e1",
    backend_fingerprint="fp-1",
    max_model_len=4096,
)

BASE: dict[str, Any] = {
    "model": "m",
    "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
    "tool_choice": "auto",
    "response_format": {"type": "text"},
    "temperature": 0,
    "top_p": 1.0,
    "top_k": -1,
    "min_p": 0.0,
    "seed": 1,
    "n": 1,
    "max_tokens": 16,
    "stop": ["\n\n"],
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "repetition_penalty": 1.0,
    "logit_bias": {"42": 1},
    "logprobs": False,
    "top_logprobs": 0,
    "parallel_tool_calls": True,
    "reasoning_effort": "low",
    "chat_template_kwargs": {"enable_thinking": False},
    "max_completion_tokens": 16,
}

# Each changes what the backend generates (or how the prompt renders).
OUTPUT_AFFECTING: dict[str, Any] = {
    "model": "m2",
    "messages": [{"role": "user", "content": "Hi!"}],
    "tools": [{"type": "function", "function": {"name": "g", "parameters": {"type": "object"}}}],
    "tool_choice": "required",
    "response_format": {"type": "json_object"},
    "temperature": 0.5,
    "top_p": 0.9,
    "top_k": 40,
    "min_p": 0.05,
    "seed": 2,
    "n": 2,
    "max_tokens": 17,
    "stop": ["END"],
    "presence_penalty": 0.5,
    "frequency_penalty": 0.5,
    "repetition_penalty": 1.1,
    "logit_bias": {"42": -100},
    "logprobs": True,
    "top_logprobs": 3,
    "parallel_tool_calls": False,
    "reasoning_effort": "high",
    "chat_template_kwargs": {"enable_thinking": True},
    "max_completion_tokens": 17,
}
# Each leaves the output as it is: who asks, how it is delivered, where it is kept.
HARMLESS: dict[str, Any] = {
    "user": "someone",
    "metadata": {"run": "7"},
    "stream": True,
    "stream_options": {"include_usage": True},
    "store": True,
    "safety_identifier": "abc",
    "convstate_cache": {"mode": "use", "force": True},
}


def key(body: dict[str, Any], backend: BackendModelInfo | None = BACKEND) -> str:
    return replay_key(Endpoint.CHAT, body, backend, force=False).key


def test_there_are_23_output_affecting_fields_and_7_harmless_ones() -> None:
    assert len(OUTPUT_AFFECTING) == 23 and set(OUTPUT_AFFECTING) == set(BASE)
    assert len(HARMLESS) == 7


@pytest.mark.parametrize("field", sorted(OUTPUT_AFFECTING))
def test_changing_an_output_affecting_field_changes_the_key(field: str) -> None:
    assert key({**BASE, field: OUTPUT_AFFECTING[field]}) != key(BASE)


@pytest.mark.parametrize("field", sorted(OUTPUT_AFFECTING))
def test_dropping_an_output_affecting_field_changes_the_key(field: str) -> None:
    assert key({name: value for name, value in BASE.items() if name != field}) != key(BASE)


@pytest.mark.parametrize("field", sorted(HARMLESS))
def test_a_field_that_cannot_change_the_output_does_not_split_the_cache(field: str) -> None:
    assert key({**BASE, field: HARMLESS[field]}) == key(BASE)


def test_an_unknown_field_splits_the_cache() -> None:
    """Fail closed: a field the service does not know may change the output."""
    assert key({**BASE, "guided_choice": ["a", "b"]}) != key(BASE)


def test_top_level_order_does_not_matter_but_nested_order_does() -> None:
    assert key(dict(reversed(list(BASE.items())))) == key(BASE)
    schema = {"type": "object", "properties": {"a": {}, "b": {}}}
    reordered = {"properties": {"b": {}, "a": {}}, "type": "object"}
    tool: dict[str, Any] = {"type": "function", "function": {"name": "f", "parameters": schema}}
    other = copy.deepcopy(tool)
    other["function"]["parameters"] = reordered
    # A template renders `tools | tojson` in the order sent: a reordered schema is another prompt.
    assert key({**BASE, "tools": [tool]}) != key({**BASE, "tools": [other]})


@pytest.mark.parametrize("part", ["revision", "tokenizer", "renderer", "chat_template", "lora"])
def test_the_model_identity_is_part_of_the_key(part: str) -> None:
    assert key(BASE, BackendModelInfo(**{**asdict(BACKEND), part: "changed"})) != key(BASE)


def test_block_size_and_epoch_are_not() -> None:
    assert key(BASE, replace(BACKEND, block_size=32, epoch="e2")) == key(BASE)


def test_the_endpoint_is_part_of_the_key() -> None:
    body = {"model": "m", "prompt": "Hi", "temperature": 0}
    assert (
        replay_key(Endpoint.CHAT, body, BACKEND, False).key
        != replay_key(Endpoint.COMPLETIONS, body, BACKEND, False).key
    )


def test_an_unidentified_model_is_refused_unless_forced() -> None:
    unidentified = replace(BACKEND, revision=None)
    assert replay_key(Endpoint.CHAT, BASE, unidentified, False).refused == "unidentified_model"
    assert replay_key(Endpoint.CHAT, BASE, None, False).refused == "unidentified_model"
    assert replay_key(Endpoint.CHAT, BASE, None, True).refused is None


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({"temperature": 0}, True),
        ({"temperature": 0.0}, True),
        ({"temperature": 0.7, "seed": 3}, True),
        ({"seed": 0}, True),
        ({"temperature": 0.7}, False),
        ({}, False),  # the backend's default temperature is 1
        ({"temperature": None}, False),
        ({"temperature": False}, False),
    ],
)
def test_deterministic(settings: dict[str, Any], expected: bool) -> None:
    assert deterministic(settings) is expected


def test_a_nondeterministic_request_is_refused_unless_forced() -> None:
    sampled = {**BASE, "temperature": 0.8}
    del sampled["seed"]
    assert replay_key(Endpoint.CHAT, sampled, BACKEND, False).refused == "nondeterministic"
    assert replay_key(Endpoint.CHAT, sampled, BACKEND, True).refused is None


def test_the_canonical_request_is_what_is_stored() -> None:
    canonical = canonical_request({**BASE, "user": "u", "stream": True})
    assert list(canonical) == sorted(BASE) and "user" not in canonical


@pytest.mark.parametrize(
    ("header", "extension", "opted_in", "mode", "force"),
    [
        (None, None, False, Mode.BYPASS, False),
        (None, None, True, Mode.USE, False),
        ("use", None, False, Mode.USE, False),
        (" Refresh ", None, True, Mode.REFRESH, False),
        ("use", "bypass", True, Mode.BYPASS, False),
        (None, {"force": True}, True, Mode.USE, True),
        ("bypass", {"mode": "use", "force": True}, False, Mode.USE, True),
    ],
)
def test_cache_policy(header: str | None, extension: Any, opted_in: bool, mode: Mode, force: bool) -> None:
    policy = cache_policy(header, extension, opted_in)
    assert (policy.mode, policy.force) == (mode, force)


@pytest.mark.parametrize(
    ("header", "extension", "param"),
    [
        ("sometimes", None, "x-convstate-cache"),
        (None, "always", "convstate_cache"),
        (None, 1, "convstate_cache"),
        (None, {"mode": "use", "ttl": 3}, "convstate_cache.ttl"),
        (None, {"force": "yes"}, "convstate_cache.force"),
    ],
)
def test_a_bad_policy_is_a_400_naming_it(header: str | None, extension: Any, param: str) -> None:
    with pytest.raises(InvalidRequest) as refused:
        cache_policy(header, extension, False)
    assert refused.value.param == param


def test_a_replayed_reply_has_a_new_id_and_every_prompt_token_cached() -> None:
    stored = {
        "id": "chatcmpl-1",
        "created": 1,
        "usage": {"prompt_tokens": 9, "prompt_tokens_details": {"cached_tokens": 0}},
    }
    reply = replayed(Endpoint.CHAT, stored, "chatcmpl-2", 5)
    assert (reply["id"], reply["created"], reply["usage"]["prompt_tokens_details"]["cached_tokens"]) == (
        "chatcmpl-2",
        5,
        9,
    )
    assert stored["id"] == "chatcmpl-1"  # the stored reply is untouched


def test_a_turn_body_names_its_history_by_content_not_by_handle() -> None:
    body = {
        **BASE,
        "prompt_cache": {
            "ref": "pc_1",
            "tokens": 40,
            "prefix_hash": "ab",
            "fingerprint": "f",
            "register": True,
        },
    }
    other_handle = {**body, "prompt_cache": {**body["prompt_cache"], "ref": "pc_2", "register": False}}
    other_history = {**body, "prompt_cache": {**body["prompt_cache"], "prefix_hash": "cd"}}
    assert turn_body(body) == turn_body(other_handle)
    assert turn_body(body) != turn_body(other_history)
    # Asking for a handle on the full path leaves the same body as not asking.
    assert turn_body({**BASE, "prompt_cache": {"register": True}}) == turn_body(BASE) == BASE
