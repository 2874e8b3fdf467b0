"""Named prefixes (POST /v1/prefixes): a long common start of many requests (instructions, tools, initial
input items) registered once, so the backend holds its KV before the first request that uses it, the
service-level form of LLaMPPL's `cache_kv`.

Pure: the warm-up body a prefix is registered with, and a request with its prefix applied. A request that
names a prefix (`convstate_prefix`) starts with it: its model must be the prefix's, its instructions and
tools are the prefix's unless it sends the same ones (others are a 400: the prefix was warmed with
those), and its messages or input follow the prefix's. What is sent is then what any request would send,
so it is fingerprinted, cached and keyed as one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from service.domain.chat import chat_options
from service.domain.items import ChatMessage, history_messages, normalize_input
from service.errors import InvalidRequest

EXTENSION = "convstate_prefix"


@dataclass(frozen=True, slots=True)
class Prefix:
    name: str
    model: str
    instructions: str | None
    tools: list[dict[str, Any]] | None  # Responses function tools, as registered
    input: list[Any]  # input items as registered; normalized afresh for every request


def messages(prefix: Prefix) -> list[ChatMessage]:
    return history_messages(
        prefix.instructions, [(False, normalize_input(prefix.input))] if prefix.input else []
    )


def _chat_tools(prefix: Prefix) -> dict[str, Any]:
    return chat_options({"tools": prefix.tools}) if prefix.tools else {}


def warm_up_body(prefix: Prefix, cache_salt: str) -> dict[str, Any]:
    """One output token after the prefix, under the tenant's salt: the backend computes the prefix's KV
    and keeps it in its prefix cache for the requests that start with it."""
    return {
        "model": prefix.model,
        "messages": messages(prefix),
        **_chat_tools(prefix),
        "cache_salt": cache_salt,
        "max_tokens": 1,
    }


def _conflict(field: str, prefix: Prefix) -> InvalidRequest:
    return InvalidRequest(
        f"'{field}' differs from prefix '{prefix.name}''s, which it was warmed with; leave it out.",
        param=field,
        code="prefix_conflict",
    )


def _same_model(body: Mapping[str, Any], prefix: Prefix) -> None:
    if body.get("model") != prefix.model:
        raise InvalidRequest(
            f"Prefix '{prefix.name}' was registered for model '{prefix.model}'.",
            param="model",
            code="prefix_conflict",
        )


def apply_to_chat(body: Mapping[str, Any], prefix: Prefix) -> dict[str, Any]:
    """A chat-completions body that starts with the prefix."""
    _same_model(body, prefix)
    applied = {name: value for name, value in body.items() if name != EXTENSION}
    tools = _chat_tools(prefix)
    for field, value in tools.items():
        if field in applied and applied[field] != value:
            raise _conflict(field, prefix)
    applied.update(tools)
    applied["messages"] = [*messages(prefix), *body.get("messages", [])]
    return applied


def apply_to_responses(body: Mapping[str, Any], prefix: Prefix) -> dict[str, Any]:
    """A POST /v1/responses body that starts with the prefix: the first turn of a lineage only."""
    for field in ("previous_response_id", "conversation"):
        if body.get(field) is not None:
            raise InvalidRequest(
                f"'{EXTENSION}' starts a new lineage; it cannot be used with '{field}'.",
                param=EXTENSION,
                code="mutually_exclusive_parameters",
            )
    _same_model(body, prefix)
    applied = {name: value for name, value in body.items() if name != EXTENSION}
    for field, value in (("instructions", prefix.instructions), ("tools", prefix.tools)):
        if value is None:
            continue
        if applied.get(field) is not None and applied[field] != value:
            raise _conflict(field, prefix)
        applied[field] = value
    own = body.get("input")
    applied["input"] = [
        *prefix.input,
        *([{"role": "user", "content": own}] if isinstance(own, str) else own or []),
    ]
    return applied
