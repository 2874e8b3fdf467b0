"""Rendering: the concatenation property the cache-reference path is built on, and the profiles."""

from __future__ import annotations

import base64
from typing import Any

import pytest
import xxhash
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from service.backends.reference.generate import GenerationSettings, Plan, complete, plan_reply
from service.backends.reference.media import inline_remote_media
from service.backends.reference.protocol import ApiError
from service.backends.reference.render import (
    Encoder,
    Message,
    NotAppendable,
    RenderContext,
    RenderError,
    ToolCall,
    assistant_body,
    content_text,
    make_context,
    parse_message,
    render_append,
    render_full,
)
from service.backends.reference.tokenizer import IM_END, load_tokenizer
from tests.conftest import MediaServer

ENCODER = Encoder(load_tokenizer())
PROFILES = ("chatml", "reasoning-trim", "system-once")
TOOLS = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]

texts = st.lists(
    st.one_of(
        st.text(st.characters(codec="utf-8"), max_size=8),
        st.sampled_from(["<think>", "</think>", "<|im_end|>", "\n", " ", "{", '"', "assistant"]),
    ),
    max_size=6,
).map("".join)
tool_calls = st.lists(st.builds(ToolCall, st.sampled_from(["lookup", "f"]), texts), max_size=2).map(tuple)
messages = st.one_of(
    st.builds(Message, st.sampled_from(["system", "developer", "user"]), texts),
    st.builds(Message, st.just("assistant"), texts, st.one_of(st.none(), texts), tool_calls),
    st.builds(Message, st.just("tool"), texts, tool_call_id=st.text(max_size=8)),
)
contexts = st.builds(
    make_context,
    st.just("m"),
    st.sampled_from(PROFILES),
    tools=st.sampled_from([None, TOOLS]),
    reasoning_effort=st.sampled_from([None, "low", "high"]),
    chat_template_kwargs=st.sampled_from([None, {}, {"enable_thinking": True}]),
    cache_salt=st.none(),
)


def tokens(ctx: RenderContext, history: list[Message]) -> list[int]:
    return ENCODER.encode(render_full(ctx, history).text)


@settings(max_examples=200, deadline=None)
@given(contexts, st.lists(messages, min_size=1, max_size=6), st.lists(messages, max_size=4))
def test_append_equals_full_render(ctx: RenderContext, head: list[Message], tail: list[Message]) -> None:
    prefix = render_full(ctx, head)
    try:
        appended = render_append(ctx, prefix.system_open, tail)
    except NotAppendable:
        # Refused only where a full render would put a system message into the leading block.
        assert any(m.role in ("system", "developer") for m in tail)
        assert ctx.profile == "system-once" or prefix.system_open
        return
    full = tokens(ctx, head + tail)
    assert ENCODER.encode(prefix.text) + ENCODER.encode(appended.text) == full
    assert render_full(ctx, head + tail).system_open == appended.system_open


@settings(max_examples=100, deadline=None)
@given(contexts, st.lists(messages, min_size=1, max_size=6))
def test_tokens_of_a_render_are_the_tokens_of_its_messages(
    ctx: RenderContext, history: list[Message]
) -> None:
    # Where every message renders in place (no system message gathered into the leading block).
    assume(ctx.profile != "system-once" and history[0].role not in ("system", "developer"))
    whole = ENCODER.encode(render_full(ctx, history).text + "<|im_start|>assistant\n")
    parts = [render_full(ctx, history[:1]).text] + [render_append(ctx, False, [m]).text for m in history[1:]]
    assert whole == [t for part in parts for t in ENCODER.encode(part)] + ENCODER.generation_prompt


def test_system_block_folds_tools_reasoning_and_kwargs() -> None:
    ctx = make_context(
        "m",
        "chatml",
        tools=TOOLS,
        reasoning_effort=None,
        chat_template_kwargs={"reasoning_effort": "high", "b": 1, "a": [1, 2]},
        cache_salt=None,
    )
    text = render_full(ctx, [Message("user", "hi")]).text
    # As `| tojson` renders in Hugging Face templates: insertion order, spaced separators.
    assert text == (
        '<|im_start|>system\n# Tools\n[{"type": "function", "function": {"name": "lookup", "parameters": '
        '{"type": "object"}}}]\n\nReasoning: high\n\n# Template kwargs\n{"b": 1, "a": [1, 2]}<|im_end|>\n'
        "<|im_start|>user\nhi<|im_end|>\n"
    )
    assert ctx.thinking
    bare = make_context(
        "m", "chatml", tools=None, reasoning_effort=None, chat_template_kwargs=None, cache_salt=None
    )
    assert render_full(bare, [Message("user", "hi")]).text == "<|im_start|>user\nhi<|im_end|>\n"
    assert bare.context_hash != ctx.context_hash


def test_key_order_of_tools_changes_the_render_and_the_context() -> None:
    reordered = [{"function": {"parameters": {"type": "object"}, "name": "lookup"}, "type": "function"}]
    contexts = [
        make_context(
            "m", "chatml", tools=t, reasoning_effort=None, chat_template_kwargs=None, cache_salt=None
        )
        for t in (TOOLS, reordered)
    ]
    renders = {render_full(ctx, [Message("user", "hi")]).text for ctx in contexts}
    assert len(renders) == 2 and contexts[0].context_hash != contexts[1].context_hash


def test_a_response_format_renders_in_the_system_block() -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "object"}}}
    ctx = make_context(
        "m",
        "chatml",
        tools=None,
        reasoning_effort=None,
        chat_template_kwargs=None,
        cache_salt=None,
        response_format=fmt,
    )
    assert render_full(ctx, [Message("user", "hi")]).text.startswith(
        '<|im_start|>system\n# Response format\n{"type": "json_schema", "json_schema": {"name": "a"'
    )


def test_profiles_differ_where_they_should() -> None:
    history = [
        Message("system", "S1"),
        Message("user", "u"),
        Message("assistant", "a", "why", (ToolCall("f", '{"x":1}'),)),
        Message("tool", "r", tool_call_id="call_1"),
        Message("developer", "S2"),
    ]
    render = {
        p: render_full(
            make_context(
                "m", p, tools=None, reasoning_effort=None, chat_template_kwargs=None, cache_salt=None
            ),
            history,
        ).text
        for p in PROFILES
    }
    call = '<tool_call>{"name":"f","arguments":{"x":1}}</tool_call>'
    assert f"<|im_start|>assistant\n<think>why</think>a{call}<|im_end|>" in render["chatml"]
    assert f"<|im_start|>assistant\na{call}<|im_end|>" in render["reasoning-trim"]
    assert "<|im_start|>tool\ntool_call_id: call_1\nr<|im_end|>" in render["chatml"]
    assert render["chatml"].endswith("<|im_start|>developer\nS2<|im_end|>\n")
    assert render["system-once"].startswith("<|im_start|>system\nS1\n\nS2<|im_end|>\n")
    assert "developer" not in render["system-once"]


def test_content_parts_render_by_identity() -> None:
    png = base64.b64encode(b"\x89PNG fake").decode()
    parts = [
        {"type": "text", "text": "look"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}"}},
        {"type": "file", "file": {"file_data": f"data:application/pdf;base64,{png}", "filename": "r.pdf"}},
    ]
    digest = xxhash.xxh3_64_hexdigest(b"\x89PNG fake")
    assert content_text(parts, "m") == f"look\n<image:{digest}>\n<file:r.pdf:{digest}>"


def _image_body(url: str) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]}


async def test_remote_images_render_by_the_bytes_served_now(media_server: MediaServer) -> None:
    url = media_server.put("cat.png", b"one")
    body = _image_body(url)
    await inline_remote_media(body)
    first = content_text(body["messages"][0]["content"], "m")
    media_server.put("cat.png", b"two")
    body["messages"][0]["content"][0]["image_url"]["url"] = url
    await inline_remote_media(body)
    assert first == f"<image:{xxhash.xxh3_64_hexdigest(b'one')}>"
    assert content_text(body["messages"][0]["content"], "m") == f"<image:{xxhash.xxh3_64_hexdigest(b'two')}>"


async def test_an_image_that_cannot_be_fetched_is_a_400(media_server: MediaServer) -> None:
    url = f"{media_server.server.url}/img/missing.png"
    body = _image_body(url)
    with pytest.raises(ApiError) as failure:
        await inline_remote_media(body)
    assert failure.value.status == 400


@pytest.mark.parametrize(
    "raw",
    [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}],
        },
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:nocomma"}}]},
        {"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]},
        {"role": "wizard", "content": "x"},
        {"role": "tool", "content": "x"},
        {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": {"x": 1}}}]},
    ],
)
def test_malformed_messages_are_render_errors(raw: dict[str, object]) -> None:
    with pytest.raises(RenderError):
        parse_message(raw, 0)


def test_reasoning_alias_is_accepted() -> None:
    assert parse_message({"role": "assistant", "content": "a", "reasoning": "r"}, 0).reasoning == "r"


@pytest.mark.parametrize("thinking", [False, True])
@pytest.mark.parametrize("tool_choice", ["none", "required"])
def test_generated_output_is_the_template_assistant_body(thinking: bool, tool_choice: str) -> None:
    settings_ = GenerationSettings(TOOLS, tool_choice, True, None, None, thinking)
    plan = plan_reply("ab" * 16, Message("user", "hi"), settings_)
    done = complete(plan, ENCODER, 10_000)
    rendered = assistant_body(done.message(), keep_reasoning=True) + IM_END
    assert done.token_ids == ENCODER.encode(rendered)
    assert done.finish_reason == ("tool_calls" if tool_choice == "required" else "stop")


def test_cut_output_keeps_only_whole_tool_calls() -> None:
    plan = Plan(None, "", (ToolCall("f", '{"a":"x"}'), ToolCall("g", '{"b":"y"}')), ("call_1", "call_2"))
    whole = complete(plan, ENCODER, 10_000)
    first_call_end = next(i for i, s in enumerate(whole.segments) if s.text == "</tool_call>")
    budget = sum(len(s.ids) for s in whole.segments[: first_call_end + 1]) + 3
    cut = complete(plan, ENCODER, budget)
    assert cut.finish_reason == "length" and len(cut.token_ids) == budget
    assert cut.message().tool_calls == plan.tool_calls[:1]
    assert cut.message().text  # the partial second call surfaces as text
