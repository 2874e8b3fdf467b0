"""Chat completion and completion objects as the proxy relays them: one assembled from its stream's chunks
(what a streamed request stores), and one replayed as chunks (what a streamed request that hits gets).

Pure. Text fields of a delta (`content`, `reasoning`, `reasoning_content`, `refusal`, a completion's
`text`) are concatenated per choice, tool calls by their index, log-probabilities appended; the
finishing reason and the usage are the last ones seen.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from service.domain.replay import Endpoint

Chunk = dict[str, Any]

_DELTA_TEXT = ("content", "reasoning", "reasoning_content", "refusal")
# A completion's log-probabilities are parallel lists, appended chunk after chunk.
_COMPLETION_LOGPROBS = ("tokens", "token_logprobs", "top_logprobs", "text_offset")
# Chunk fields that describe the chunk, not the reply.
_CHUNK_ONLY = frozenset({"choices", "object", "usage"})


class _Choice:
    def __init__(self, index: int) -> None:
        self.index = index
        self.text: dict[str, str] = {}
        self.calls: dict[int, dict[str, Any]] = {}
        self.logprobs: dict[str, list[Any]] | None = None
        self.finish_reason: str | None = None
        self.extra: dict[str, Any] = {}

    def feed_chat(self, choice: Mapping[str, Any]) -> None:
        delta = choice.get("delta") or {}
        for key in _DELTA_TEXT:
            if isinstance(delta.get(key), str):
                self.text[key] = self.text.get(key, "") + delta[key]
        for call in delta.get("tool_calls") or []:
            index = int(call.get("index") or 0)
            stored = self.calls.setdefault(
                index, {"id": None, "type": "function", "function": {"name": None, "arguments": ""}}
            )
            function = call.get("function") or {}
            stored["id"] = stored["id"] or call.get("id")
            stored["function"]["name"] = stored["function"]["name"] or function.get("name")
            stored["function"]["arguments"] += function.get("arguments") or ""
        self._feed_logprobs(choice.get("logprobs"), ("content",))
        self._finish(choice)

    def feed_completion(self, choice: Mapping[str, Any]) -> None:
        if isinstance(choice.get("text"), str):
            self.text["text"] = self.text.get("text", "") + choice["text"]
        self._feed_logprobs(choice.get("logprobs"), _COMPLETION_LOGPROBS)
        self._finish(choice)

    def _feed_logprobs(self, logprobs: Any, keys: Iterable[str]) -> None:
        if not isinstance(logprobs, dict):
            return
        self.logprobs = self.logprobs or {}
        for key in keys:
            if isinstance(logprobs.get(key), list):
                self.logprobs.setdefault(key, []).extend(logprobs[key])

    def _finish(self, choice: Mapping[str, Any]) -> None:
        self.finish_reason = choice.get("finish_reason") or self.finish_reason
        if choice.get("stop_reason") is not None:
            self.extra["stop_reason"] = choice["stop_reason"]

    def chat(self) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": self.text.get("content")}
        message.update({key: self.text[key] for key in _DELTA_TEXT[1:] if key in self.text})
        if self.calls:
            message["tool_calls"] = [self.calls[index] for index in sorted(self.calls)]
        return {
            "index": self.index,
            "message": message,
            "logprobs": self.logprobs,
            "finish_reason": self.finish_reason,
            **self.extra,
        }

    def completion(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "text": self.text.get("text", ""),
            "logprobs": self.logprobs,
            "finish_reason": self.finish_reason,
            **self.extra,
        }


class Assembler:
    """Feed a stream's chunks as they pass; `reply()` is the object the same request would have got
    whole."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self._choices: dict[int, _Choice] = {}
        self._top: dict[str, Any] = {}

    def feed(self, chunk: Mapping[str, Any]) -> None:
        self._top.update({key: value for key, value in chunk.items() if key not in _CHUNK_ONLY})
        if chunk.get("usage"):
            self._top["usage"] = chunk["usage"]
        for choice in chunk.get("choices") or []:
            index = int(choice.get("index") or 0)
            state = self._choices.setdefault(index, _Choice(index))
            if self.endpoint is Endpoint.CHAT:
                state.feed_chat(choice)
            else:
                state.feed_completion(choice)

    def reply(self) -> dict[str, Any]:
        chat = self.endpoint is Endpoint.CHAT
        choices = [self._choices[index] for index in sorted(self._choices)]
        return {
            **self._top,
            "object": "chat.completion" if chat else "text_completion",
            "choices": [choice.chat() if chat else choice.completion() for choice in choices],
            "usage": self._top.get("usage"),
        }


def replay_chunks(endpoint: Endpoint, reply: Mapping[str, Any], include_usage: bool) -> list[Chunk]:
    """A whole reply as the chunks of a stream: per choice its role, its content (text, reasoning, tool
    calls and log-probabilities in one delta) and its finishing reason; then the usage if asked."""
    head = {
        key: value
        for key, value in reply.items()
        if key not in ("choices", "usage", "object", "prompt_logprobs")
    }
    chat = endpoint is Endpoint.CHAT
    head["object"] = "chat.completion.chunk" if chat else "text_completion"
    chunks: list[Chunk] = []
    for choice in reply.get("choices") or []:
        index = choice.get("index", 0)
        if chat:
            message = dict(choice.get("message") or {})
            role = message.pop("role", "assistant")
            calls = message.pop("tool_calls", None) or []
            delta = {key: value for key, value in message.items() if value is not None}
            if calls:
                delta["tool_calls"] = [{"index": i, **call} for i, call in enumerate(calls)]
            chunks += [
                {**head, "choices": [_chunk_choice(index, {"role": role, "content": ""}, None, None)]},
                {**head, "choices": [_chunk_choice(index, delta, choice.get("logprobs"), None)]},
                {**head, "choices": [_chunk_choice(index, {}, None, choice.get("finish_reason"))]},
            ]
        else:
            piece = {
                "index": index,
                "text": choice.get("text", ""),
                "logprobs": choice.get("logprobs"),
                "finish_reason": choice.get("finish_reason"),
            }
            chunks.append({**head, "choices": [piece]})
    if include_usage:
        chunks.append({**head, "choices": [], "usage": reply.get("usage")})
    return chunks


def _chunk_choice(index: int, delta: dict[str, Any], logprobs: Any, finish_reason: str | None) -> Chunk:
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
