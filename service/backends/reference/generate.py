"""Deterministic "generation": the reply is a pure function of the prompt digest, the last message
and the request's settings, so two paths that build the same prompt get the same reply."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import xxhash

from service.backends.reference.render import (
    Encoder,
    Message,
    ToolCall,
    canonical_json,
    tool_call_text,
)
from service.backends.reference.tokenizer import (
    IM_END,
    THINK_CLOSE,
    THINK_OPEN,
    TOOL_CALL_CLOSE,
    TOOL_CALL_OPEN,
    WORDS,
    utf8_pieces,
)

ToolChoice = str | Mapping[str, Any]


@dataclass(frozen=True)
class GenerationSettings:
    tools: Sequence[Mapping[str, Any]]
    tool_choice: ToolChoice
    parallel_tool_calls: bool
    response_format: Mapping[str, Any] | None
    seed: int | None
    thinking: bool


@dataclass(frozen=True)
class Plan:
    """What the model would say if it were never cut off."""

    reasoning: str | None
    content: str
    tool_calls: tuple[ToolCall, ...]
    call_ids: tuple[str, ...]


class _Stream:
    """A deterministic word stream keyed by the prompt digest and the settings."""

    def __init__(self, key: str) -> None:
        self._key = key.encode("utf-8")
        self._n = 0

    def next(self, modulo: int) -> int:
        self._n += 1
        return xxhash.xxh3_64_intdigest(self._key + self._n.to_bytes(8, "little")) % modulo

    def words(self, low: int, spread: int) -> str:
        return " ".join(WORDS[self.next(len(WORDS))] for _ in range(low + self.next(spread)))


def plan_reply(digest: str, last: Message, settings: GenerationSettings) -> Plan:
    stream = _Stream(canonical_json([digest, settings.seed, settings.response_format]))
    label = int(digest[:8], 16) % 1000
    reasoning = f"Reasoning {label}: {stream.words(4, 12)}." if settings.thinking else None
    calls = _select_tools(last, settings)
    if calls:
        tool_calls = tuple(ToolCall(name, canonical_json(example_value(params))) for name, params in calls)
        call_ids = tuple(
            "call_" + xxhash.xxh3_128_hexdigest(f"{digest}:{i}:{c.name}".encode())[:24]
            for i, c in enumerate(tool_calls)
        )
        return Plan(reasoning, "", tool_calls, call_ids)
    if last.role == "tool":
        text = f'Answer {label}: the tool returned "{last.text[:200]}". {stream.words(4, 8)}.'
    else:
        text = f"Answer {label}: {stream.words(6, 20)}."
    return Plan(reasoning, _shape(text, settings.response_format), (), ())


def _shape(text: str, response_format: Mapping[str, Any] | None) -> str:
    kind = (response_format or {}).get("type", "text")
    if kind == "json_schema":
        schema = ((response_format or {}).get("json_schema") or {}).get("schema") or {}
        value = example_value(schema) if isinstance(schema, dict) else None
        return canonical_json(value if isinstance(value, dict) and value else {"answer": text})
    if kind == "json_object":
        return canonical_json({"answer": text})
    return text


def _select_tools(last: Message, settings: GenerationSettings) -> list[tuple[str, Any]]:
    choice = settings.tool_choice
    if not settings.tools or choice == "none":
        return []
    tools = [(t["function"]["name"], t["function"].get("parameters") or {}) for t in settings.tools]
    if isinstance(choice, Mapping):
        return [t for t in tools if t[0] == choice["function"]["name"]][:1]
    mentioned = [t for t in tools if last.role == "user" and t[0] in last.text]
    if choice == "required" and not mentioned:
        mentioned = tools[:1]
    return mentioned if settings.parallel_tool_calls else mentioned[:1]


def example_value(schema: Any) -> Any:
    """The smallest value a JSON schema accepts, built from required properties only."""
    if not isinstance(schema, dict):
        return "x"
    if schema.get("enum"):
        return schema["enum"][0]
    if "const" in schema:
        return schema["const"]
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object" or (kind is None and "properties" in schema):
        props = schema.get("properties") or {}
        return {name: example_value(props.get(name)) for name in schema.get("required") or []}
    defaults: dict[str, Any] = {"number": 1, "integer": 1, "boolean": True, "array": [], "null": None}
    return defaults.get(kind, "x") if isinstance(kind, str) else "x"


# --- from plan to tokens ---------------------------------------------------------------------

SegmentKind = Literal["special", "reasoning", "content", "tool"]
Delta = dict[str, Any]


@dataclass(frozen=True)
class Segment:
    kind: SegmentKind
    ids: list[int]
    text: str
    call: int = -1  # index into the plan's tool calls, for "tool" segments


@dataclass(frozen=True)
class Completion:
    """A plan cut to max_tokens, as token segments; everything a reply needs is derived here."""

    plan: Plan
    segments: list[Segment]
    finish_reason: str
    complete_calls: int

    @property
    def token_ids(self) -> list[int]:
        return [t for s in self.segments for t in s.ids]

    @property
    def reasoning_tokens(self) -> int:
        return sum(
            len(s.ids)
            for s in self.segments
            if s.kind == "reasoning" or (s.kind == "special" and s.text in (THINK_OPEN, THINK_CLOSE))
        )

    def _is_text(self, seg: Segment, kind: SegmentKind) -> bool:
        # A tool call cut off mid-way is surfaced as content, as a tool parser would leave it.
        partial_call = seg.kind == "tool" and seg.call >= self.complete_calls
        return seg.kind == kind or (kind == "content" and partial_call)

    def _text(self, kind: SegmentKind) -> str:
        return "".join(s.text for s in self.segments if self._is_text(s, kind))

    def message(self) -> Message:
        """The assistant message as returned, hence as the next turn's history will hold it."""
        calls = self.plan.tool_calls[: self.complete_calls]
        return Message("assistant", self._text("content"), self._text("reasoning") or None, calls)

    def tool_call_objects(self) -> list[dict[str, Any]]:
        return [
            {
                "id": self.plan.call_ids[i],
                "type": "function",
                "function": {"name": c.name, "arguments": c.arguments},
            }
            for i, c in enumerate(self.plan.tool_calls[: self.complete_calls])
        ]

    def stream_deltas(
        self, encoder: Encoder, chunk_tokens: int
    ) -> tuple[list[tuple[Delta, list[int]]], list[int]]:
        """(delta, token ids) per chunk, and the ids left for the final chunk. Special tokens ride
        with the next chunk, so the chunks' token ids concatenate to the whole output."""
        events: list[tuple[Delta, list[int]]] = []
        pending: list[int] = []
        for seg in self.segments:
            if seg.kind == "special":
                pending += seg.ids
            elif seg.kind == "tool" and seg.call < self.complete_calls:
                call = self.plan.tool_calls[seg.call]
                head = {
                    "index": seg.call,
                    "id": self.plan.call_ids[seg.call],
                    "type": "function",
                    "function": {"name": call.name, "arguments": ""},
                }
                events.append(({"tool_calls": [head]}, pending + seg.ids))
                pending = []
                for piece in _pieces(encoder, encoder.encode(call.arguments), chunk_tokens):
                    if piece:
                        args = {"index": seg.call, "function": {"arguments": piece}}
                        events.append(({"tool_calls": [args]}, []))
            else:
                keys = ("reasoning", "reasoning_content") if seg.kind == "reasoning" else ("content",)
                groups = _groups(seg.ids, chunk_tokens)
                for group, piece in zip(groups, _pieces(encoder, seg.ids, chunk_tokens), strict=True):
                    pending += group
                    if piece:
                        events.append(({k: piece for k in keys}, pending))
                        pending = []
        return events, pending


def _groups(ids: list[int], size: int) -> list[list[int]]:
    return [ids[i : i + size] for i in range(0, len(ids), size)]


def _pieces(encoder: Encoder, ids: list[int], size: int) -> list[str]:
    return utf8_pieces([encoder.bytes_of(g) for g in _groups(ids, size)])


def complete(plan: Plan, encoder: Encoder, max_tokens: int) -> Completion:
    """Tokenize the planned output, which is exactly the assistant body the template renders with
    reasoning kept, followed by <|im_end|>, and cut it at max_tokens."""
    full: list[Segment] = []

    def add(kind: SegmentKind, text: str, call: int = -1) -> None:
        if text:
            full.append(Segment(kind, encoder.encode(text), text, call))

    if plan.reasoning:
        add("special", THINK_OPEN)
        add("reasoning", plan.reasoning)
        add("special", THINK_CLOSE)
    add("content", plan.content)
    for i, call in enumerate(plan.tool_calls):
        add("special", TOOL_CALL_OPEN)
        add("tool", tool_call_text(call)[len(TOOL_CALL_OPEN) : -len(TOOL_CALL_CLOSE)], i)
        add("special", TOOL_CALL_CLOSE, i)
    add("special", IM_END)

    kept: list[Segment] = []
    budget = max_tokens
    for seg in full:
        if len(seg.ids) <= budget:
            kept.append(seg)
            budget -= len(seg.ids)
            continue
        if budget and seg.kind != "special":
            ids = seg.ids[:budget]
            kept.append(Segment(seg.kind, ids, utf8_pieces([encoder.bytes_of(ids)])[0], seg.call))
        done = sum(1 for s in kept if s.kind == "special" and s.text == TOOL_CALL_CLOSE)
        return Completion(plan, kept, "length", done)
    finish = "tool_calls" if plan.tool_calls else "stop"
    return Completion(plan, kept, finish, len(plan.tool_calls))
