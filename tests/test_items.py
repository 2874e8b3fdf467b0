"""Items <-> chat messages: segment-local conversion, validation errors with the offending param."""

from __future__ import annotations

import base64

import pytest

from service.domain.items import history_messages, normalize_input, segment_messages
from service.domain.output import output_items
from service.errors import InvalidRequest


def test_string_input_is_one_user_message() -> None:
    (item,) = normalize_input("hi")
    assert item["id"].startswith("msg_") and len(item["id"]) == 4 + 48
    assert item["content"] == [{"type": "input_text", "text": "hi"}]
    assert segment_messages([item]) == [{"role": "user", "content": "hi"}]


def test_output_segment_becomes_one_assistant_message() -> None:
    calls = [
        {"id": "call_1", "function": {"name": "f", "arguments": "{}"}},
        {"id": "call_2", "function": {"name": "g", "arguments": '{"a":1}'}},
    ]
    items = output_items("text", "thinking", calls)
    assert [item["type"] for item in items] == ["reasoning", "message", "function_call", "function_call"]
    assert [item["id"][:3] for item in items] == ["rs_", "msg", "fc_", "fc_"]
    assert segment_messages(items, output=True) == [
        {
            "role": "assistant",
            "content": "text",
            "reasoning": "thinking",
            "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}},
                {"id": "call_2", "type": "function", "function": {"name": "g", "arguments": '{"a":1}'}},
            ],
        }
    ]


def test_empty_reply_is_still_an_assistant_turn() -> None:
    assert segment_messages(output_items("", None, []), output=True) == [{"role": "assistant", "content": ""}]


def test_history_is_the_concatenation_of_segments() -> None:
    first = normalize_input([{"role": "user", "content": "q"}])
    reply = output_items(None, None, [{"id": "c", "function": {"name": "f", "arguments": "{}"}}])
    tool = normalize_input([{"type": "function_call_output", "call_id": "c", "output": "42"}])
    segments = [(False, first), (True, reply), (False, tool)]
    whole = history_messages("sys", segments)
    assert whole == [{"role": "system", "content": "sys"}] + [
        m for output, s in segments for m in segment_messages(s, output=output)
    ]
    assert whole[-1] == {"role": "tool", "tool_call_id": "c", "content": "42"}


def test_multimodal_parts() -> None:
    data = "data:image/png;base64," + base64.b64encode(b"\x89PNG").decode()
    (item,) = normalize_input(
        [
            {
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "see"},
                    {"type": "input_image", "image_url": data},
                ],
            }
        ]
    )
    assert segment_messages([item])[0]["content"] == [
        {"type": "text", "text": "see"},
        {"type": "image_url", "image_url": {"url": data}},
    ]


@pytest.mark.parametrize(
    ("raw", "param"),
    [
        ([], "input"),
        (["x"], "input[0]"),
        ([{"type": "bogus"}], "input[0].type"),
        ([{"role": "robot", "content": "x"}], "input[0].role"),
        ([{"role": "user", "content": []}], "input[0].content"),
        ([{"role": "user", "content": [{"type": "input_audio"}]}], "input[0].content[0].type"),
        (
            [{"role": "user", "content": [{"type": "input_image", "image_url": "data:image/png;base64,@@"}]}],
            "input[0].content[0].image_url",
        ),
        ([{"type": "function_call_output", "call_id": "c"}], "input[0].output"),
        ([{"type": "function_call", "name": "f", "arguments": "{}"}], "input[0].call_id"),
    ],
)
def test_invalid_input_names_the_param(raw: list[object], param: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        normalize_input(raw)
    assert caught.value.param == param
