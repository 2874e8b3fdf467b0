"""Model execution fingerprints: what must be identical for a stored prefix to be reusable.

The fingerprint of a turn is computed from the backend body the turn sends, not from the request that
produced it: every field of the body except the messages, the cache reference and the fields declared
in SAMPLING_FIELDS is hashed, so a field that reaches the backend reaches the fingerprint by
construction. Fields are grouped into named parts so a record can tell *which* part changed; a field no
part names falls into the `request` part rather than being skipped.

Each part is hashed separately over the exact JSON bytes the body carries (orjson, insertion order:
chat templates render `tools | tojson` in the order the client wrote, so a different key order is a
different prompt), with the part name and the key format version folded in. The combined fingerprint is
the hash of the ordered part hashes. The encoding is pinned by golden tests: changing it must bump
KEY_FORMAT_VERSION, which itself is a part, so old records fail closed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson
import xxhash

KEY_FORMAT_VERSION = "2"

# Comparison order matters: the first differing part names the reason.
PARTS: tuple[str, ...] = (
    "key_format",
    "model",
    "tokenizer",
    "renderer",
    "chat_template",
    "lora",
    "cache_salt",
    "block_size",
    "instructions",
    "tools",
    "reasoning",
    "response_format",
    "request",
    "media",
)

# Body fields that never change the rendered prompt, only how tokens are sampled or reported. They are
# the only fields left out of the fingerprint; adding one here is a claim the oracle tests check.
SAMPLING_FIELDS = frozenset(
    {
        "temperature",
        "top_p",
        "presence_penalty",
        "frequency_penalty",
        "max_tokens",
        "logprobs",
        "top_logprobs",
        "user",
        "stream",
        "stream_options",
        "return_token_ids",
    }
)
# Body fields that are not request settings: the messages (covered by the prefix hash), the cache
# reference, and the model and salt (covered by the backend's parts and the `cache_salt` part).
ENVELOPE_FIELDS = frozenset({"messages", "prompt_cache", "model", "cache_salt"})
# Which part each known render field belongs to; any other field goes to `request`.
FIELD_PARTS: Mapping[str, str] = {
    "tools": "tools",
    "tool_choice": "tools",
    "parallel_tool_calls": "tools",
    "reasoning_effort": "reasoning",
    "response_format": "response_format",
}
# The media part of a turn whose messages hold content the service cannot pin (see media_pinned).
PINNED = "pinned"


def part_hash(name: str, value: Any) -> str:
    """xxh3-128 of the part's JSON as the body carries it (insertion order, no whitespace, UTF-8)."""
    return xxhash.xxh3_128_hexdigest(orjson.dumps([KEY_FORMAT_VERSION, name, value]))


@dataclass(frozen=True, slots=True)
class BackendModelInfo:
    """What the backend reports for a model (the `prompt_cache` extension of /v1/models). A None part is
    unknown: upstream vLLM reports none of them, and every decision against it fails closed."""

    model: str
    revision: str | None
    tokenizer: str | None
    renderer: str | None
    chat_template: str | None
    lora: str | None  # "none" for a base model; the adapter's identity (name and revision) otherwise
    block_size: int | None
    epoch: str | None
    backend_fingerprint: str | None
    max_model_len: int | None
    # The backend continues a prompt from an earlier turn's token ids (`prompt_cache.seed`).
    seeds: bool = False


def backend_parts(backend: BackendModelInfo | None) -> dict[str, str | None]:
    """The parts the backend vouches for; all unknown when the model card is missing."""

    def known(name: str, value: Any) -> str | None:
        return None if value is None else part_hash(name, value)

    if backend is None:
        return dict.fromkeys(("model", "tokenizer", "renderer", "chat_template", "lora", "block_size"))
    return {
        "model": known("model", [backend.model, backend.revision]) if backend.revision else None,
        "tokenizer": known("tokenizer", backend.tokenizer),
        "renderer": known("renderer", backend.renderer),
        "chat_template": known("chat_template", backend.chat_template),
        "lora": known("lora", backend.lora),
        "block_size": known("block_size", backend.block_size),
    }


def settings_parts(settings: Mapping[str, Any]) -> dict[str, str]:
    """The parts of a body's settings (every field but the envelope and sampling fields), by FIELD_PARTS;
    a part with no field present hashes as empty, so adding a field later changes it."""
    grouped: dict[str, dict[str, Any]] = {"tools": {}, "reasoning": {}, "response_format": {}, "request": {}}
    for field_name, value in settings.items():
        if field_name in SAMPLING_FIELDS or field_name in ENVELOPE_FIELDS:
            continue
        grouped[FIELD_PARTS.get(field_name, "request")][field_name] = value
    return {name: part_hash(name, fields) for name, fields in grouped.items()}


def media_pinned(messages: Iterable[Mapping[str, Any]]) -> bool:
    """True if every media part is carried by value (a data: URL or inline file data). A URL the
    backend fetches may serve other bytes next time, so a prefix holding one is never reusable."""
    for message in messages:
        content = message.get("content")
        if not isinstance(content, list):
            continue
        for part in content:
            if isinstance(part, dict) and part.get("type") == "image_url":
                url = (part.get("image_url") or {}).get("url")
                if not (isinstance(url, str) and url.startswith("data:")):
                    return False
    return True


def turn_parts(
    backend: BackendModelInfo | None,
    cache_salt_id: str | None,
    instructions: str | None,
    settings: Mapping[str, Any],
    messages: Iterable[Mapping[str, Any]],
) -> dict[str, str | None]:
    """Every part of a turn that sends `settings` (the body without its messages) and `messages`."""
    return {
        "key_format": part_hash("key_format", KEY_FORMAT_VERSION),
        **backend_parts(backend),
        "cache_salt": None if cache_salt_id is None else part_hash("cache_salt", cache_salt_id),
        "instructions": part_hash("instructions", instructions or ""),
        **settings_parts(settings),
        "media": part_hash("media", PINNED) if media_pinned(messages) else None,
    }


def combined_fingerprint(parts: Mapping[str, str | None]) -> str | None:
    if any(parts.get(name) is None for name in PARTS):
        return None
    return xxhash.xxh3_128_hexdigest(orjson.dumps([parts[name] for name in PARTS]))
