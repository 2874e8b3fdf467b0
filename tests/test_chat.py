"""Request settings -> chat-completions fields."""

from __future__ import annotations

from service.domain.chat import chat_options, responses_usage

TOOL = {"type": "function", "name": "f", "description": "d", "parameters": {"type": "object"}, "strict": True}


def test_unset_settings_send_nothing() -> None:
    assert chat_options({}) == {}


def test_every_setting_maps() -> None:
    options = chat_options(
        {
            "temperature": 0.2,
            "top_p": 0.9,
            "presence_penalty": 0.5,
            "frequency_penalty": -0.5,
            "max_output_tokens": 64,
            "tools": [TOOL],
            "tool_choice": {"type": "function", "name": "f"},
            "max_tool_calls": 1,
            "reasoning": {"effort": "high"},
            "text": {
                "format": {"type": "json_schema", "name": "s", "schema": {"type": "object"}, "strict": True}
            },
            "include": ["message.output_text.logprobs"],
            "safety_identifier": "u1",
        }
    )
    assert options == {
        "temperature": 0.2,
        "top_p": 0.9,
        "presence_penalty": 0.5,
        "frequency_penalty": -0.5,
        "max_tokens": 64,
        "tools": [{"type": "function", "function": {k: v for k, v in TOOL.items() if k != "type"}}],
        "tool_choice": {"type": "function", "function": {"name": "f"}},
        "parallel_tool_calls": False,
        "reasoning_effort": "high",
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "s", "schema": {"type": "object"}, "strict": True},
        },
        "logprobs": True,
        "user": "u1",
    }


def test_tool_choice_without_tools_is_not_sent() -> None:
    assert chat_options({"tool_choice": "required", "parallel_tool_calls": True}) == {}


def test_usage() -> None:
    assert responses_usage(10, 5, 8, 2) == {
        "input_tokens": 10,
        "input_tokens_details": {"cached_tokens": 8, "cache_write_tokens": 0},
        "output_tokens": 5,
        "output_tokens_details": {"reasoning_tokens": 2},
        "total_tokens": 15,
    }
