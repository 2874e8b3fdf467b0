"""Chat rendering: messages -> ChatML-like text -> token ids, under one of three template profiles.

Every message renders as `<|im_start|>{role}\\n{body}<|im_end|>\\n`. Message boundaries are therefore
special-token boundaries, which the tokenizer never merges across, so the tokens of a rendered
conversation are the concatenation of the tokens of its rendered messages. The cache-reference path
relies on exactly that: handle tokens + tokens(render(new messages)) == tokens(render(everything)).
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any
from urllib.parse import unquote_to_bytes

import orjson
import xxhash
from tokenizers import Tokenizer

from service.backends.reference.tokenizer import (
    IM_END,
    IM_START,
    THINK_CLOSE,
    THINK_OPEN,
    TOOL_CALL_CLOSE,
    TOOL_CALL_OPEN,
    token_byte_table,
)

RENDERER_VERSION = "convstate-ref/1"
GENERATION_PROMPT = f"{IM_START}assistant\n"
SYSTEM_ROLES = frozenset({"system", "developer"})
ROLES = SYSTEM_ROLES | {"user", "assistant", "tool"}

# What each profile's template is, in words; its hash is the chat_template fingerprint part.
PROFILE_TEMPLATES = {
    "chatml": "chatml: leading system block, every message in place, reasoning kept",
    "reasoning-trim": "reasoning-trim: leading system block, assistant reasoning dropped from history",
    "system-once": "system-once: all system/developer messages merged into the leading block",
}


class RenderError(ValueError):
    """The request cannot be rendered (a malformed message or content part): HTTP 400."""


class NotAppendable(Exception):
    """The profile cannot append these messages to an existing prefix without re-rendering it."""


def canonical_json(value: object) -> str:
    """Sorted keys, no whitespace: for identities and for what the simulated model writes."""
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode("utf-8")


def tojson(value: object) -> str:
    """JSON as Hugging Face chat templates render it with `| tojson`: keys in insertion order (the order
    the client wrote them), `, ` and `: ` separators, non-ASCII kept. A client that reorders the keys of
    a tool schema changes the prompt."""
    return json.dumps(value, ensure_ascii=False)


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # rendered verbatim: the template never re-serializes what the model wrote


@dataclass(frozen=True)
class Message:
    role: str
    text: str
    reasoning: str | None = None
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None


@dataclass(frozen=True)
class RenderContext:
    """Everything besides the messages that shapes the render; a handle is bound to its hash."""

    model: str
    profile: str
    tools: tuple[Mapping[str, Any], ...] = ()
    reasoning_effort: str | None = None
    template_kwargs: Mapping[str, Any] = field(default_factory=dict)
    cache_salt: str | None = None
    response_format: Mapping[str, Any] | None = None

    @cached_property
    def context_hash(self) -> str:
        """Everything besides the messages that the render depends on, in the order it renders."""
        return xxhash.xxh3_128_hexdigest(
            orjson.dumps(
                [
                    self.model,
                    self.profile,
                    list(self.tools),
                    self.reasoning_effort,
                    dict(self.template_kwargs),
                    self.cache_salt,
                    self.response_format,
                ]
            )
        )

    @property
    def thinking(self) -> bool:
        """Does the model produce reasoning under this context?"""
        effort_on = self.reasoning_effort is not None and self.reasoning_effort != "none"
        return effort_on or self.template_kwargs.get("enable_thinking") is True

    def system_sections(self) -> list[str]:
        sections = []
        if self.tools:
            sections.append("# Tools\n" + tojson(list(self.tools)))
        if self.reasoning_effort is not None:
            sections.append(f"Reasoning: {self.reasoning_effort}")
        if self.template_kwargs:
            sections.append("# Template kwargs\n" + tojson(dict(self.template_kwargs)))
        # Like the templates that state a structured-output schema in the system block (gpt-oss's
        # "# Response Formats"), so a changed format changes the prompt.
        if self.response_format is not None and self.response_format.get("type") != "text":
            sections.append("# Response format\n" + tojson(dict(self.response_format)))
        return sections


def make_context(
    model: str,
    profile: str,
    *,
    tools: Sequence[Mapping[str, Any]] | None,
    reasoning_effort: str | None,
    chat_template_kwargs: Mapping[str, Any] | None,
    cache_salt: str | None,
    response_format: Mapping[str, Any] | None = None,
) -> RenderContext:
    """Fold `chat_template_kwargs.reasoning_effort` into the effort, as vLLM merges the two."""
    kwargs = dict(chat_template_kwargs or {})
    kwargs_effort = kwargs.pop("reasoning_effort", None)
    effort = reasoning_effort if reasoning_effort is not None else kwargs_effort
    if effort is not None and not isinstance(effort, str):
        raise RenderError("reasoning_effort must be a string")
    return RenderContext(
        model=model,
        profile=profile,
        tools=tuple(tools or ()),
        reasoning_effort=effort,
        template_kwargs=kwargs,
        cache_salt=cache_salt,
        response_format=response_format,
    )


# --- message parsing -------------------------------------------------------------------------


def parse_messages(raw: object) -> list[Message]:
    if not isinstance(raw, list):
        raise RenderError("messages must be a list")
    return [parse_message(item, index) for index, item in enumerate(raw)]


def parse_message(raw: object, index: int) -> Message:
    where = f"messages[{index}]"
    if not isinstance(raw, dict):
        raise RenderError(f"{where} must be an object")
    role = raw.get("role")
    if role not in ROLES:
        raise RenderError(f"{where}.role must be one of {sorted(ROLES)}")
    text = content_text(raw.get("content"), where)
    if role == "assistant":
        # As vLLM: `reasoning`, else the deprecated `reasoning_content`.
        reasoning = raw.get("reasoning")
        if reasoning is None:
            reasoning = raw.get("reasoning_content")
        if reasoning is not None and not isinstance(reasoning, str):
            raise RenderError(f"{where}.reasoning_content must be a string")
        return Message(role, text, reasoning or None, _tool_calls(raw.get("tool_calls"), where))
    if role == "tool":
        call_id = raw.get("tool_call_id")
        if not isinstance(call_id, str):
            raise RenderError(f"{where}.tool_call_id is required for tool messages")
        return Message(role, text, tool_call_id=call_id)
    return Message(role, text)


def _tool_calls(raw: object, where: str) -> tuple[ToolCall, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise RenderError(f"{where}.tool_calls must be a list")
    calls = []
    for i, call in enumerate(raw):
        function = call.get("function") if isinstance(call, dict) else None
        name = function.get("name") if isinstance(function, dict) else None
        arguments = function.get("arguments") if isinstance(function, dict) else None
        if not isinstance(name, str) or not isinstance(arguments, str):
            raise RenderError(f"{where}.tool_calls[{i}].function needs string name and arguments")
        calls.append(ToolCall(name, arguments))
    return tuple(calls)


def content_text(content: object, where: str) -> str:
    """String content as is; parts joined by newlines, each media part by its content digest."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise RenderError(f"{where}.content must be a string or a list of parts")
    return "\n".join(_part_text(part, f"{where}.content[{i}]") for i, part in enumerate(content))


def _part_text(part: object, where: str) -> str:
    if not isinstance(part, dict):
        raise RenderError(f"{where} must be an object")
    kind = part.get("type")
    if kind in ("text", "input_text", "refusal"):
        value = part.get("refusal" if kind == "refusal" else "text")
        if not isinstance(value, str):
            raise RenderError(f"{where}.text must be a string")
        return value
    if kind == "image_url":
        image = part.get("image_url")
        url = image.get("url") if isinstance(image, dict) else image
        if not isinstance(url, str):
            raise RenderError(f"{where}.image_url.url must be a string")
        if url.startswith("data:"):
            return f"<image:{_digest(_data_url_bytes(url, where))}>"
        # http(s) URLs were fetched and inlined before rendering (media.inline_remote_media).
        raise RenderError(f"{where}.image_url.url must be a data: or http(s) URL")
    if kind == "file":
        file = part.get("file")
        if not isinstance(file, dict):
            raise RenderError(f"{where}.file must be an object")
        filename = file.get("filename") or ""
        data, file_id = file.get("file_data"), file.get("file_id")
        if isinstance(data, str):
            payload = _data_url_bytes(data, where) if data.startswith("data:") else _b64(data, where)
        elif isinstance(file_id, str):
            payload = file_id.encode("utf-8")
        else:
            raise RenderError(f"{where}.file needs file_data or file_id")
        if not isinstance(filename, str):
            raise RenderError(f"{where}.file.filename must be a string")
        return f"<file:{filename}:{_digest(payload)}>"
    raise RenderError(f"{where}: unsupported content part type {kind!r}")


def _digest(data: bytes) -> str:
    return xxhash.xxh3_64_hexdigest(data)


def _data_url_bytes(url: str, where: str) -> bytes:
    header, comma, payload = url[5:].partition(",")
    if not comma:
        raise RenderError(f"{where}: malformed data URL")
    if header.endswith(";base64"):
        return _b64(payload, where)
    return unquote_to_bytes(payload)


def _b64(payload: str, where: str) -> bytes:
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RenderError(f"{where}: invalid base64 data") from exc


# --- rendering -------------------------------------------------------------------------------


def _wrap(role: str, body: str) -> str:
    return f"{IM_START}{role}\n{body}{IM_END}\n"


def assistant_body(message: Message, *, keep_reasoning: bool) -> str:
    """The assistant body; with reasoning kept it is also exactly what the model generates."""
    head = f"{THINK_OPEN}{message.reasoning}{THINK_CLOSE}" if keep_reasoning and message.reasoning else ""
    return head + message.text + "".join(tool_call_text(call) for call in message.tool_calls)


def tool_call_text(call: ToolCall) -> str:
    name = orjson.dumps(call.name).decode("utf-8")
    return f'{TOOL_CALL_OPEN}{{"name":{name},"arguments":{call.arguments}}}{TOOL_CALL_CLOSE}'


def message_text(profile: str, message: Message) -> str:
    """A message rendered in place (never the leading system block)."""
    if message.role == "assistant":
        return _wrap("assistant", assistant_body(message, keep_reasoning=profile != "reasoning-trim"))
    if message.role == "tool":
        return _wrap("tool", f"tool_call_id: {message.tool_call_id}\n{message.text}")
    return _wrap(message.role, message.text)


@dataclass(frozen=True)
class Rendered:
    """Rendered text without the generation prompt, and whether it ends inside the system block
    (only the leading system block so far, so a following system message would merge into it)."""

    text: str
    system_open: bool


def render_full(ctx: RenderContext, messages: Sequence[Message]) -> Rendered:
    if ctx.profile == "system-once":
        system = [m for m in messages if m.role in SYSTEM_ROLES]
        rest = [m for m in messages if m.role not in SYSTEM_ROLES]
    else:
        lead = 0
        while lead < len(messages) and messages[lead].role in SYSTEM_ROLES:
            lead += 1
        system, rest = list(messages[:lead]), list(messages[lead:])
    parts = [m.text for m in system] + ctx.system_sections()
    head = _wrap("system", "\n\n".join(parts)) if system or parts else ""
    return Rendered(head + "".join(message_text(ctx.profile, m) for m in rest), system_open=not rest)


def render_append(ctx: RenderContext, system_open: bool, messages: Sequence[Message]) -> Rendered:
    """Render `messages` to append after a prefix; NotAppendable if a full render would differ."""
    if ctx.profile == "system-once" or system_open:
        # A system message here would join the leading block, i.e. change tokens already rendered.
        # (Profiles other than system-once render later system messages in place.)
        leading = messages if ctx.profile == "system-once" else messages[:1]
        if any(m.role in SYSTEM_ROLES for m in leading):
            raise NotAppendable("a system/developer message cannot be appended to this prefix")
    text = "".join(message_text(ctx.profile, m) for m in messages)
    return Rendered(text, system_open=system_open and not messages)


class Encoder:
    """Text <-> token ids with the shipped tokenizer; special tokens in the text are honoured."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._bytes = token_byte_table(tokenizer)
        self.generation_prompt = self.encode(GENERATION_PROMPT)

    def encode(self, text: str) -> list[int]:
        if not text:
            return []
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def bytes_of(self, token_ids: Sequence[int]) -> bytes:
        table = self._bytes
        return b"".join(table[t] for t in token_ids)

    def valid(self, token_ids: Sequence[int]) -> bool:
        return all(0 <= t < len(self._bytes) for t in token_ids)
