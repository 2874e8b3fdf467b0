"""Responses items <-> chat-completions messages, pure.

Conversion is by *segment*: the input items of one request, or the output items of one response. A run of
assistant-side items (reasoning, assistant message, function calls) inside a segment becomes one assistant
message; runs never cross a segment. So the messages of a whole history are exactly the concatenation of
its segments' messages, which is what makes sending only the new segments (the cache path) render the
same tokens as sending everything (the full path).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable, Sequence
from typing import Any

import orjson

from service.domain import ids
from service.errors import InvalidRequest

Item = dict[str, Any]
ChatMessage = dict[str, Any]

MESSAGE_ROLES = ("user", "system", "developer", "assistant")
_INPUT_PART_TYPES = ("input_text", "input_image", "input_file")
IMAGE_DETAILS = ("auto", "low", "high", "original")
MAX_INLINE_BYTES = 20 * 1024 * 1024


def _text_part(text: str, role: str) -> dict[str, Any]:
    if role == "assistant":
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
    return {"type": "input_text", "text": text}


def _require_str(value: Any, param: str) -> str:
    if not isinstance(value, str):
        raise InvalidRequest(f"Invalid type for '{param}': expected a string.", param=param)
    return value


def _check_data_url(url: str, param: str) -> None:
    if not url.startswith("data:"):
        return
    header, sep, payload = url.partition(",")
    if not sep or ";base64" not in header:
        raise InvalidRequest(
            f"Invalid data URL in '{param}': expected data:<mime>;base64,<data>.", param=param
        )
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(f"Invalid base64 data in '{param}'.", param=param) from None
    if len(raw) > MAX_INLINE_BYTES:
        raise InvalidRequest(f"'{param}' is larger than {MAX_INLINE_BYTES} bytes.", param=param)


def _normalize_part(part: Any, role: str, param: str) -> dict[str, Any]:
    if not isinstance(part, dict):
        raise InvalidRequest(f"Invalid type for '{param}': expected an object.", param=param)
    kind = part.get("type")
    if role == "assistant":
        if kind not in ("output_text", "refusal"):
            raise InvalidRequest(
                f"Invalid value for '{param}.type': assistant content must be output_text or refusal.",
                param=f"{param}.type",
            )
        key = "text" if kind == "output_text" else "refusal"
        text = _require_str(part.get(key), f"{param}.{key}")
        return _text_part(text, role) if kind == "output_text" else {"type": "refusal", "refusal": text}
    if kind == "input_text":
        return {"type": "input_text", "text": _require_str(part.get("text"), f"{param}.text")}
    if kind == "input_image":
        url = part.get("image_url")
        if part.get("file_id") is not None:
            raise InvalidRequest(
                "file_id images are not supported; send image_url.", param=f"{param}.file_id"
            )
        url = _require_str(url, f"{param}.image_url")
        _check_data_url(url, f"{param}.image_url")
        detail = part.get("detail") or "auto"
        if detail not in IMAGE_DETAILS:
            raise InvalidRequest(
                f"Invalid value for '{param}.detail': expected one of {', '.join(IMAGE_DETAILS)}.",
                param=f"{param}.detail",
            )
        return {"type": "input_image", "image_url": url, "detail": detail}
    if kind == "input_file":
        data = _require_str(part.get("file_data"), f"{param}.file_data")
        _check_data_url(data, f"{param}.file_data")
        filename = part.get("filename") or "file"
        return {
            "type": "input_file",
            "file_data": data,
            "filename": _require_str(filename, f"{param}.filename"),
        }
    raise InvalidRequest(
        f"Invalid value for '{param}.type': expected one of {', '.join(_INPUT_PART_TYPES)}.",
        param=f"{param}.type",
    )


def _normalize_message(raw: Item, param: str) -> Item:
    role = raw.get("role")
    if role not in MESSAGE_ROLES:
        raise InvalidRequest(
            f"Invalid value for '{param}.role': expected one of {', '.join(MESSAGE_ROLES)}.",
            param=f"{param}.role",
        )
    content = raw.get("content")
    if isinstance(content, str):
        parts = [_text_part(content, role)]
    elif isinstance(content, list) and content:
        parts = [_normalize_part(p, role, f"{param}.content[{i}]") for i, p in enumerate(content)]
    else:
        raise InvalidRequest(
            f"Invalid value for '{param}.content': expected a string or a non-empty list of parts.",
            param=f"{param}.content",
        )
    return {
        "id": ids.new_id(ids.MESSAGE),
        "type": "message",
        "role": role,
        "content": parts,
        "status": "completed",
    }


def _normalize_function_call(raw: Item, param: str) -> Item:
    return {
        "id": ids.new_id(ids.FUNCTION_CALL),
        "type": "function_call",
        "call_id": _require_str(raw.get("call_id"), f"{param}.call_id"),
        "name": _require_str(raw.get("name"), f"{param}.name"),
        "arguments": _require_str(raw.get("arguments"), f"{param}.arguments"),
        "status": "completed",
    }


def _normalize_function_call_output(raw: Item, param: str) -> Item:
    output = raw.get("output")
    if not isinstance(output, str):
        raise InvalidRequest(
            f"Invalid type for '{param}.output': expected a string.", param=f"{param}.output"
        )
    return {
        "id": ids.new_id(ids.FUNCTION_CALL_OUTPUT),
        "type": "function_call_output",
        "call_id": _require_str(raw.get("call_id"), f"{param}.call_id"),
        "output": output,
        "status": "completed",
    }


def _reasoning_parts(raw: Item, key: str, kind: str, param: str) -> list[dict[str, str]]:
    """`summary` or `content` of a reasoning item, as OpenAI shapes them: [{"type": kind, "text": ...}]."""
    parts = raw.get(key) or []
    if not isinstance(parts, list):
        raise InvalidRequest(f"Invalid type for '{param}.{key}': expected a list.", param=f"{param}.{key}")
    normalized = []
    for index, part in enumerate(parts):
        where = f"{param}.{key}[{index}]"
        if not isinstance(part, dict):
            raise InvalidRequest(f"Invalid type for '{where}': expected an object.", param=where)
        normalized.append({"type": kind, "text": _require_str(part.get("text"), f"{where}.text")})
    return normalized


def _normalize_reasoning(raw: Item, param: str) -> Item:
    return {
        "id": ids.new_id(ids.REASONING),
        "type": "reasoning",
        "summary": _reasoning_parts(raw, "summary", "summary_text", param),
        "content": _reasoning_parts(raw, "content", "reasoning_text", param),
    }


COMPACTION_PREFIX = "Summary of the conversation so far:\n"


def compaction_item(summary: str) -> Item:
    """The item that stands for compacted history. Its content is opaque to clients (OpenAI's is
    encrypted); here it is base64 JSON, and it is only ever rendered as text, like any input."""
    content = base64.b64encode(orjson.dumps({"v": 1, "summary": summary})).decode()
    return {"id": ids.new_id(ids.COMPACTION), "type": "compaction", "encrypted_content": content}


def compaction_summary(item: Item) -> str:
    summary = orjson.loads(base64.b64decode(item["encrypted_content"], validate=True))["summary"]
    if not isinstance(summary, str):
        raise TypeError("a compaction's summary is a string")
    return summary


def _normalize_compaction(raw: Item, param: str) -> Item:
    content = _require_str(raw.get("encrypted_content"), f"{param}.encrypted_content")
    item = {"id": ids.new_id(ids.COMPACTION), "type": "compaction", "encrypted_content": content}
    try:
        compaction_summary(item)
    except (binascii.Error, ValueError, KeyError, TypeError):
        raise InvalidRequest(
            f"Invalid '{param}.encrypted_content': not a compaction this service produced.",
            param=f"{param}.encrypted_content",
        ) from None
    return item


_NORMALIZERS = {
    "message": _normalize_message,
    "function_call": _normalize_function_call,
    "function_call_output": _normalize_function_call_output,
    "reasoning": _normalize_reasoning,
    "compaction": _normalize_compaction,
}


def normalize_input(raw_input: str | Sequence[Any]) -> list[Item]:
    """Validate request input and return stored-form items with fresh ids. Raises InvalidRequest."""
    if isinstance(raw_input, str):
        return [_normalize_message({"role": "user", "content": raw_input}, "input")]
    if not raw_input:
        raise InvalidRequest("'input' must not be empty.", param="input")
    items: list[Item] = []
    for index, raw in enumerate(raw_input):
        param = f"input[{index}]"
        if not isinstance(raw, dict):
            raise InvalidRequest(f"Invalid type for '{param}': expected an object.", param=param)
        kind = raw.get("type", "message")
        normalizer = _NORMALIZERS.get(kind) if isinstance(kind, str) else None
        if normalizer is None:
            raise InvalidRequest(
                f"Invalid value for '{param}.type': unsupported item type {kind!r}; supported: "
                + ", ".join(_NORMALIZERS),
                param=f"{param}.type",
            )
        items.append(normalizer(raw, param))
    return items


# --- items -> chat messages -------------------------------------------------------------------------


def _chat_content(parts: list[dict[str, Any]]) -> str | list[dict[str, Any]]:
    if len(parts) == 1 and parts[0]["type"] == "input_text":
        text: str = parts[0]["text"]
        return text
    chat_parts: list[dict[str, Any]] = []
    for part in parts:
        kind = part["type"]
        if kind == "input_text":
            chat_parts.append({"type": "text", "text": part["text"]})
        elif kind == "input_image":
            chat_parts.append({"type": "image_url", "image_url": {"url": part["image_url"]}})
        elif kind == "input_file":
            chat_parts.append(
                {"type": "file", "file": {"file_data": part["file_data"], "filename": part["filename"]}}
            )
    return chat_parts


def reasoning_text(item: Item) -> str:
    parts = item.get("content") or item.get("summary") or []
    return "".join(str(part.get("text", "")) for part in parts if isinstance(part, dict))


def assistant_text(item: Item) -> str:
    return "".join(
        part.get("text", "") if part["type"] == "output_text" else part.get("refusal", "")
        for part in item["content"]
    )


def output_message(items: Iterable[Item]) -> ChatMessage | None:
    """A response's output is one assistant turn: one message, whatever order its items arrived in."""
    reasoning: list[str] = []
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for item in items:
        if item["type"] == "reasoning":
            reasoning.append(reasoning_text(item))
        elif item["type"] == "message":
            texts.append(assistant_text(item))
        elif item["type"] == "function_call":
            calls.append(_tool_call(item))
    if not (reasoning or texts or calls):
        return None
    message: ChatMessage = {"role": "assistant", "content": "".join(texts) if texts else None}
    if reasoning:
        message["reasoning"] = "".join(reasoning)
    if calls:
        message["tool_calls"] = calls
    return message


def _tool_call(item: Item) -> dict[str, Any]:
    return {
        "id": item["call_id"],
        "type": "function",
        "function": {"name": item["name"], "arguments": item["arguments"]},
    }


def segment_messages(items: Sequence[Item], *, output: bool = False) -> list[ChatMessage]:
    """Chat messages of one segment: a request's input, or (output=True) a response's output."""
    if output:
        message = output_message(items)
        return [message] if message else []
    messages: list[ChatMessage] = []
    assistant: ChatMessage | None = None

    def open_assistant(force_new: bool) -> ChatMessage:
        nonlocal assistant
        if assistant is None or force_new:
            assistant = {"role": "assistant", "content": None}
            messages.append(assistant)
        return assistant

    for item in items:
        kind = item["type"]
        if kind == "reasoning":
            current = assistant
            force = current is not None and (
                "reasoning" in current or current["content"] is not None or "tool_calls" in current
            )
            open_assistant(force)["reasoning"] = reasoning_text(item)
        elif kind == "message" and item["role"] == "assistant":
            force = assistant is not None and (assistant["content"] is not None or "tool_calls" in assistant)
            open_assistant(force)["content"] = assistant_text(item)
        elif kind == "function_call":
            open_assistant(False).setdefault("tool_calls", []).append(_tool_call(item))
        elif kind == "function_call_output":
            assistant = None
            messages.append({"role": "tool", "tool_call_id": item["call_id"], "content": item["output"]})
        elif kind == "compaction":
            assistant = None
            messages.append({"role": "user", "content": COMPACTION_PREFIX + compaction_summary(item)})
        else:
            assistant = None
            messages.append({"role": item["role"], "content": _chat_content(item["content"])})
    return messages


Segment = tuple[bool, Sequence[Item]]  # (is the output of a response, its items)


def history_messages(instructions: str | None, segments: Iterable[Segment]) -> list[ChatMessage]:
    """The full chat history: the request's instructions as the system message, then every segment."""
    messages: list[ChatMessage] = []
    if instructions:
        messages.append({"role": "system", "content": instructions})
    for is_output, items in segments:
        messages.extend(segment_messages(items, output=is_output))
    return messages
