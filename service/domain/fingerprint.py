"""Model execution fingerprints: what must be identical for a stored prefix to be reusable.

Each part is hashed separately over a canonical byte encoding (sorted-key, compact JSON; UTF-8; the part
name and the key format version folded in), so a record can tell *which* part changed, and the combined
fingerprint is the hash of the ordered part hashes. The encoding is pinned by golden tests: changing it
must bump KEY_FORMAT_VERSION, which itself is a part, so old records fail closed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson
import xxhash

KEY_FORMAT_VERSION = "1"

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
)


def canonical_bytes(value: Any) -> bytes:
    """Stable across processes and machines: sorted keys, no whitespace, UTF-8, no NaN."""
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)


def part_hash(name: str, value: Any) -> str:
    return xxhash.xxh3_128_hexdigest(canonical_bytes([KEY_FORMAT_VERSION, name, value]))


@dataclass(frozen=True, slots=True)
class BackendModelInfo:
    """What the backend reports for a model (the `prompt_cache` extension of /v1/models)."""

    model: str
    revision: str | None
    tokenizer: str | None
    renderer: str | None
    chat_template: str | None
    lora: str | None
    block_size: int | None
    epoch: str | None
    backend_fingerprint: str | None
    max_model_len: int | None


@dataclass(frozen=True, slots=True)
class RequestRenderSettings:
    """The request's settings that change what the backend renders."""

    instructions: str | None
    tools: Any
    tool_choice: Any
    reasoning: Any
    chat_template_kwargs: Mapping[str, Any] | None
    cache_salt_id: str | None


def fingerprint_parts(backend: BackendModelInfo, request: RequestRenderSettings) -> dict[str, str | None]:
    """Hash of every part; None where the part is unknown (which makes any comparison fail closed)."""

    def known(name: str, value: Any) -> str | None:
        return None if value is None else part_hash(name, value)

    return {
        "key_format": part_hash("key_format", KEY_FORMAT_VERSION),
        "model": known("model", [backend.model, backend.revision]) if backend.revision else None,
        "tokenizer": known("tokenizer", backend.tokenizer),
        "renderer": known("renderer", backend.renderer),
        "chat_template": (
            part_hash("chat_template", [backend.chat_template, dict(request.chat_template_kwargs or {})])
            if backend.chat_template is not None
            else None
        ),
        "lora": part_hash("lora", backend.lora),
        "cache_salt": known("cache_salt", request.cache_salt_id),
        "block_size": known("block_size", backend.block_size),
        "instructions": part_hash("instructions", request.instructions or ""),
        "tools": part_hash("tools", [request.tools or [], request.tool_choice]),
        "reasoning": part_hash("reasoning", request.reasoning),
    }


def combined_fingerprint(parts: Mapping[str, str | None]) -> str | None:
    if any(parts.get(name) is None for name in PARTS):
        return None
    return xxhash.xxh3_128_hexdigest(canonical_bytes([parts[name] for name in PARTS]))
