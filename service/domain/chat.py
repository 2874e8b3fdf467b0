"""A Responses request's settings as chat-completions fields, and chat usage as a Responses usage object.

Pure translation; what is sent to the backend besides messages is decided here, in one place.
"""

from __future__ import annotations

from typing import Any


def _tools(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Responses function tools (flat) -> chat-completions tools (nested under `function`)."""
    return [
        {
            "type": "function",
            "function": {
                key: tool[key] for key in ("name", "description", "parameters", "strict") if key in tool
            },
        }
        for tool in tools
    ]


def _tool_choice(choice: Any) -> Any:
    if isinstance(choice, dict) and choice.get("type") == "function":
        return {"type": "function", "function": {"name": choice.get("name")}}
    return choice


def _parallel_tool_calls(settings: dict[str, Any]) -> bool | None:
    # A cap of one call is the one max_tool_calls value a chat backend can honour: no parallel calls.
    if settings.get("max_tool_calls") == 1:
        return False
    value: bool | None = settings.get("parallel_tool_calls")
    return value


def _response_format(text: dict[str, Any] | None) -> dict[str, Any] | None:
    fmt = (text or {}).get("format") or {}
    kind = fmt.get("type")
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        schema = {key: fmt[key] for key in ("name", "schema", "strict", "description") if key in fmt}
        return {"type": "json_schema", "json_schema": schema}
    return None


def _reasoning_effort(reasoning: dict[str, Any] | None) -> str | None:
    effort = (reasoning or {}).get("effort")
    return str(effort) if effort else None


def chat_options(settings: dict[str, Any]) -> dict[str, Any]:
    """The chat-completions fields for a request's settings, omitting everything unset."""
    tools = settings.get("tools")
    wants_logprobs = "message.output_text.logprobs" in (settings.get("include") or ())
    options = {
        "temperature": settings.get("temperature"),
        "top_p": settings.get("top_p"),
        "presence_penalty": settings.get("presence_penalty"),
        "frequency_penalty": settings.get("frequency_penalty"),
        "max_tokens": settings.get("max_output_tokens"),
        "tools": _tools(tools) if tools else None,
        "tool_choice": _tool_choice(settings.get("tool_choice")) if tools else None,
        "parallel_tool_calls": _parallel_tool_calls(settings) if tools else None,
        "reasoning_effort": _reasoning_effort(settings.get("reasoning")),
        "response_format": _response_format(settings.get("text")),
        "top_logprobs": settings.get("top_logprobs"),
        "logprobs": True if settings.get("top_logprobs") or wants_logprobs else None,
        "user": settings.get("safety_identifier") or settings.get("user"),
    }
    return {key: value for key, value in options.items() if value is not None}


def responses_usage(
    prompt: int, completion: int, cached: int, reasoning: int, cache_write: int = 0
) -> dict[str, Any]:
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": cache_write},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": reasoning},
        "total_tokens": prompt + completion,
    }
