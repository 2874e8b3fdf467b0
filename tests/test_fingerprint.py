"""The fingerprint is computed from the body that is sent: golden values pin its encoding (a change here
must bump KEY_FORMAT_VERSION), and every field a request can put on the wire either changes it or is a
declared sampling field."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from service.backends.client import _model_info
from service.domain import plan as planning
from service.domain.chat import chat_options
from service.domain.fingerprint import (
    PARTS,
    SAMPLING_FIELDS,
    BackendModelInfo,
    combined_fingerprint,
    media_pinned,
    part_hash,
    turn_parts,
)
from service.domain.policy import BackendMode
from service.domain.prefix import TokenDigest, pack_tokens, token_digest
from tests.factories import parent_prefix

BACKEND = BackendModelInfo(
    model="m",
    revision="r1",
    tokenizer="tok",
    renderer="ref/1",
    chat_template="tpl",
    lora="none",
    block_size=16,
    epoch="e",
    backend_fingerprint="f",
    max_model_len=1024,
)
TOOL: dict[str, Any] = {
    "type": "function",
    "name": "lookup",
    "description": "Look a word up.",
    "parameters": {"type": "object", "properties": {"word": {"type": "string"}}, "required": ["word"]},
    "strict": True,
}
# Every Responses setting that chat_options translates, set to a non-default value.
EVERY_SETTING: dict[str, Any] = {
    "temperature": 0.2,
    "top_p": 0.9,
    "presence_penalty": 0.5,
    "frequency_penalty": -0.5,
    "max_output_tokens": 64,
    "tools": [TOOL],
    "tool_choice": "required",
    "parallel_tool_calls": True,
    "reasoning": {"effort": "high"},
    "text": {"format": {"type": "json_schema", "name": "s", "schema": {"type": "object"}}},
    "top_logprobs": 2,
    "include": ["message.output_text.logprobs"],
    "safety_identifier": "u1",
}
MESSAGES = [{"role": "user", "content": "hi"}]


def _parts(settings: dict[str, Any], **overrides: Any) -> dict[str, str | None]:
    args: dict[str, Any] = {
        "backend": BACKEND,
        "cache_salt_id": "salt",
        "instructions": "Be brief.",
        "settings": settings,
        "messages": MESSAGES,
    }
    return turn_parts(**{**args, **overrides})


def _changed(value: Any) -> Any:
    """A different value of the same shape."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, str):
        return value + "x"
    if isinstance(value, list):
        return [*value, value[0]]
    return {**value, "extra": 1}


def test_token_digest_golden() -> None:
    assert pack_tokens([1, 256]) == b"\x01\x00\x00\x00\x00\x01\x00\x00"
    assert token_digest([]) == "99aa06d3014798d86001c324468d497f"
    assert token_digest([1, 2, 3]) == token_digest(iter([1, 2, 3]))
    digest = TokenDigest()
    digest.extend([1, 2])
    fork = digest.copy()
    digest.extend([3])
    assert digest.hexdigest() == token_digest([1, 2, 3]) and digest.count == 3
    assert fork.hexdigest() == token_digest([1, 2])


def test_encoding_golden() -> None:
    assert part_hash("instructions", "Be brief.") == "e35c758101b5433ca25012ffa7218dce"
    assert combined_fingerprint(_parts(chat_options(EVERY_SETTING))) == "9042d4c31a87f61eb8f5c2c501132d2b"


def test_every_field_on_the_wire_reaches_the_fingerprint_or_is_declared_sampling() -> None:
    body = chat_options(EVERY_SETTING)
    sampled = {field for field in body if field in SAMPLING_FIELDS}
    # The declared list is a claim (checked against the reference backend's render in the e2e tests):
    # a new entry must be added here on purpose.
    assert sampled == {
        "temperature",
        "top_p",
        "presence_penalty",
        "frequency_penalty",
        "max_tokens",
        "logprobs",
        "top_logprobs",
        "user",
    }
    before = combined_fingerprint(_parts(body))
    for field in body.keys() - SAMPLING_FIELDS:
        after = combined_fingerprint(_parts({**body, field: _changed(body[field])}))
        assert after != before, f"{field} is sent but does not reach the fingerprint"


def test_a_field_no_part_names_still_reaches_the_fingerprint() -> None:
    base = _parts({})
    with_new = _parts({"chat_template_kwargs": {"enable_thinking": True}})
    assert [name for name in PARTS if base[name] != with_new[name]] == ["request"]


def test_key_order_is_part_of_the_fingerprint() -> None:
    reordered = {key: TOOL[key] for key in reversed(list(TOOL))}
    first = _parts(chat_options({"tools": [TOOL]}))
    second = _parts(chat_options({"tools": [reordered]}))
    assert first["tools"] == second["tools"]  # the top-level tool keys are re-laid out by chat_options
    parameters: dict[str, Any] = TOOL["parameters"]
    nested = {**TOOL, "parameters": {key: parameters[key] for key in reversed(parameters)}}
    third = _parts(chat_options({"tools": [nested]}))
    assert third["tools"] != first["tools"]


def test_each_part_names_what_changed() -> None:
    parts = _parts({})
    cases: list[tuple[str, dict[str, Any]]] = [
        ("instructions", {"instructions": "Be long."}),
        ("cache_salt", {"cache_salt_id": "other"}),
        ("lora", {"backend": dataclasses.replace(BACKEND, lora="adapter@2")}),
        ("model", {"backend": dataclasses.replace(BACKEND, revision="r2")}),
    ]
    for name, overrides in cases:
        changed = _parts({}, **overrides)
        assert [part for part in PARTS if parts[part] != changed[part]] == [name]


def test_unknown_backend_parts_leave_the_fingerprint_unknown() -> None:
    parts = _parts({}, backend=None)
    assert parts["tokenizer"] is None and combined_fingerprint(parts) is None
    no_revision = _parts({}, backend=dataclasses.replace(BACKEND, revision=None))
    assert no_revision["model"] is None and combined_fingerprint(no_revision) is None


@pytest.mark.parametrize(
    ("extension_parts", "root", "revision", "lora"),
    [
        ({"revision": "r1", "lora": None}, "/models/x", "r1", "none"),
        ({"lora": "adapter@sha256:ab"}, "/models/x", None, "adapter@sha256:ab"),
        ({}, "/models/x", None, None),  # upstream vLLM: a path is not a revision, no LoRA claim
    ],
)
def test_model_card_parts_never_guess(
    extension_parts: dict[str, Any], root: str, revision: str | None, lora: str | None
) -> None:
    card = {"id": "x", "root": root, "prompt_cache": {"fingerprint_parts": extension_parts}}
    info = _model_info(card)
    assert (info.revision, info.lora) == (revision, lora)


def test_media_is_pinned_only_when_carried_by_value() -> None:
    def image(url: str) -> list[dict[str, Any]]:
        return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]

    assert media_pinned(image("data:image/png;base64,AAAA"))
    assert not media_pinned(image("https://images.example/cat.png"))
    assert _parts({}, messages=image("http://127.0.0.1/a.png"))["media"] is None


def test_the_cache_body_is_fingerprinted_as_the_plan_decided() -> None:
    """The shortcut in TurnPlan.sent_parts holds: hashing the cache body gives the plan's parts."""
    prefix = parent_prefix()
    render = planning.RenderInputs(
        "m",
        "Be brief.",
        [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]}],
        chat_options({"tools": [TOOL]}),
        "salt",
    )
    inputs = planning.TurnInputs(
        render=render,
        mode=BackendMode.CACHE_REF,
        store=True,
        backend=BACKEND,
        parent=None,
        has_parent=True,
        conversation_version=None,
        now=1.0,
    )
    parts = planning.plan_turn(inputs).parts
    output = [{"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "yo"}]}]
    parent = planning.ParentState(
        "resp_1", "completed", output, dataclasses.replace(prefix, fingerprint_parts=parts)
    )
    turn = planning.plan_turn(dataclasses.replace(inputs, parent=parent))
    assert turn.cache_body is not None and turn.decision.reason == "hit"
    assert planning._parts(BACKEND, render, turn.cache_body["messages"]) == turn.sent_parts(turn.cache_body)
