"""Public JSON shapes of stored objects, with every field the OpenAI SDK types require."""

from __future__ import annotations

from typing import Any

from service.store.conversations import StoredConversation
from service.store.responses import StoredResponse

_DEFAULT_TEXT = {"format": {"type": "text"}, "verbosity": "medium"}


def _text_config(text: dict[str, Any] | None) -> dict[str, Any]:
    if not text:
        return dict(_DEFAULT_TEXT)
    fmt = text.get("format") or {"type": "text"}
    return {"format": fmt, "verbosity": text.get("verbosity") or "medium"}


def response_object(response: StoredResponse) -> dict[str, Any]:
    settings = response.settings
    reasoning = settings.get("reasoning") or {}
    return {
        "id": response.id,
        "object": "response",
        "created_at": int(response.created_at),
        "status": response.status,
        "background": response.background,
        "completed_at": int(response.completed_at) if response.completed_at else None,
        "conversation": {"id": response.conversation_id} if response.conversation_id else None,
        "error": response.error,
        "incomplete_details": response.incomplete_details,
        "instructions": response.instructions,
        "max_output_tokens": settings.get("max_output_tokens"),
        "max_tool_calls": settings.get("max_tool_calls"),
        "metadata": settings.get("metadata") or {},
        "model": response.model,
        "output": response.output,
        "parallel_tool_calls": settings.get("parallel_tool_calls", True) is not False,
        "previous_response_id": response.previous_response_id,
        "prompt_cache_key": settings.get("prompt_cache_key"),
        "prompt_cache_retention": settings.get("prompt_cache_retention"),
        "reasoning": {"effort": reasoning.get("effort"), "summary": reasoning.get("summary")},
        "safety_identifier": settings.get("safety_identifier"),
        "service_tier": settings.get("service_tier") or "default",
        "store": response.store,
        "temperature": settings.get("temperature") if settings.get("temperature") is not None else 1.0,
        "text": _text_config(settings.get("text")),
        "tool_choice": settings.get("tool_choice") or "auto",
        # `description`, `parameters` and `strict` are required keys of an echoed tool, null when unset.
        "tools": [
            {"description": None, "parameters": None, "strict": None, **tool}
            for tool in settings.get("tools") or []
        ],
        "top_logprobs": settings.get("top_logprobs") or 0,
        "top_p": settings.get("top_p") if settings.get("top_p") is not None else 1.0,
        "presence_penalty": settings.get("presence_penalty") or 0.0,
        "frequency_penalty": settings.get("frequency_penalty") or 0.0,
        "truncation": settings.get("truncation") or "disabled",
        "usage": response.usage,
        "user": settings.get("user"),
    }


def list_object(data: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": has_more,
    }


def conversation_object(conversation: StoredConversation) -> dict[str, Any]:
    return {
        "id": conversation.id,
        "object": "conversation",
        "created_at": int(conversation.created_at),
        "metadata": conversation.metadata or {},
    }
