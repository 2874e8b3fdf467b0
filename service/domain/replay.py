"""The replay cache's rules: whether a request uses the cache, its key, and what a hit answers.

Pure. The key is the SHA-256 of the canonical request:

    ["replay/1", endpoint, model identity, body]

- `endpoint`: `chat.completions`, `completions`, or `responses` for a Responses turn, whose body is the
  chat-completions body the turn sends the backend (`turn_body`): its history is in it, whole or as the
  cache reference's token count and prefix digest.
- model identity: the backend's fingerprint parts for the model (model and weights revision, tokenizer,
  renderer, chat template, LoRA), as the `prompt_cache` extension of its model card reports them. A
  backend that reports none of them (upstream vLLM) leaves the model unidentified: its requests are
  not cached unless forced, because a reload under the same name would replay another model's output.
- body: the request body without the fields that cannot change the output (HARMLESS_FIELDS) and
  without the `convstate_cache` extension, its top-level keys sorted, every value exactly as sent
  (a tool schema's key order is rendered into the prompt). Any other field, known or not, is part of
  the key: a field the service has never heard of splits the cache rather than replaying a wrong answer.

The JSON is orjson's (no whitespace, UTF-8). A field sent with its default value and the same field left
out are different keys: a harmless split, never a wrong hit.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import orjson

from service.domain.fingerprint import BackendModelInfo, backend_parts
from service.errors import InvalidRequest

KEY_FORMAT = "replay/1"
HEADER = "x-convstate-cache"
EXTENSION = "convstate_cache"

# Fields that cannot change what the backend generates: who asks, how the answer is delivered, and where
# it is kept. Everything else is in the key.
HARMLESS_FIELDS = frozenset(
    {
        "user",
        "metadata",
        "stream",
        "stream_options",
        "store",
        "safety_identifier",
        "prompt_cache_key",
        "service_tier",
        "priority",
        "request_id",
        # The service sends the tenant's own salt; the tenant is part of the entry's identity.
        "cache_salt",
        EXTENSION,
    }
)
# The parts of the model's identity that decide its output; the KV block size does not.
IDENTITY_PARTS = ("model", "tokenizer", "renderer", "chat_template", "lora")


class Endpoint(StrEnum):
    CHAT = "chat.completions"
    COMPLETIONS = "completions"
    RESPONSES = "responses"  # a Responses turn, keyed on the chat body it sends (turn_body)


class Mode(StrEnum):
    USE = "use"  # answer from the cache, else ask the backend and store the answer
    BYPASS = "bypass"  # neither read nor write the cache
    REFRESH = "refresh"  # ask the backend and replace the stored answer


@dataclass(frozen=True, slots=True)
class CachePolicy:
    """What a request asked of the cache. `force` caches what would otherwise be refused: sampling
    without a seed, or a model the backend does not identify."""

    mode: Mode
    force: bool = False


def cache_policy(header: str | None, extension: Any, tenant_opted_in: bool) -> CachePolicy:
    """The request's policy: the `convstate_cache` body extension (a mode, or {"mode", "force"}) over the
    `x-convstate-cache` header over the tenant's default (`use` when it opted in, else `bypass`)."""
    mode = Mode.USE if tenant_opted_in else Mode.BYPASS
    force = False
    if header is not None:
        mode = _mode(header.strip().lower(), HEADER)
    if isinstance(extension, str):
        mode = _mode(extension, EXTENSION)
    elif isinstance(extension, dict):
        unknown = set(extension) - {"mode", "force"}
        if unknown:
            raise InvalidRequest(
                f"Unknown field '{EXTENSION}.{sorted(unknown)[0]}': expected 'mode' and 'force'.",
                param=f"{EXTENSION}.{sorted(unknown)[0]}",
                code="unknown_parameter",
            )
        if "mode" in extension:
            mode = _mode(extension["mode"], f"{EXTENSION}.mode")
        force = extension.get("force", False)
        if not isinstance(force, bool):
            raise InvalidRequest(
                f"'{EXTENSION}.force' must be a boolean.", param=f"{EXTENSION}.force", code="invalid_type"
            )
    elif extension is not None:
        raise InvalidRequest(
            f"'{EXTENSION}' must be one of 'use', 'bypass', 'refresh' or an object {{\"mode\", \"force\"}}.",
            param=EXTENSION,
            code="invalid_type",
        )
    return CachePolicy(mode, force)


def _mode(value: Any, param: str) -> Mode:
    try:
        return Mode(value)
    except ValueError:
        raise InvalidRequest(
            f"Invalid value for '{param}': expected 'use', 'bypass' or 'refresh'.",
            param=param,
            code="invalid_value",
        ) from None


@dataclass(frozen=True, slots=True)
class ReplayKey:
    """A request's place in the cache. `refused` names why it may not be cached ("nondeterministic",
    "unidentified_model"), None if it may."""

    key: str
    canonical: dict[str, Any]
    model: str
    fingerprint: str | None
    refused: str | None


def model_identity(backend: BackendModelInfo | None) -> dict[str, str | None]:
    parts = backend_parts(backend)
    return {name: parts[name] for name in IDENTITY_PARTS}


def canonical_request(body: Mapping[str, Any]) -> dict[str, Any]:
    return {name: body[name] for name in sorted(body) if name not in HARMLESS_FIELDS}


def deterministic(body: Mapping[str, Any]) -> bool:
    """Greedy sampling, or a seed: the backend answers the same request the same way. A missing
    temperature is the backend's default, 1."""
    temperature = body.get("temperature")
    greedy = temperature is not None and not isinstance(temperature, bool) and temperature == 0
    return greedy or body.get("seed") is not None


def replay_key(
    endpoint: Endpoint, body: Mapping[str, Any], backend: BackendModelInfo | None, force: bool
) -> ReplayKey:
    identity = model_identity(backend)
    canonical = canonical_request(body)
    encoded = orjson.dumps([KEY_FORMAT, str(endpoint), identity, canonical])
    refused = None
    if not force:
        if any(value is None for value in identity.values()):
            refused = "unidentified_model"
        elif not deterministic(body):
            refused = "nondeterministic"
    return ReplayKey(
        key=hashlib.sha256(encoded).hexdigest(),
        canonical=canonical,
        model=str(body.get("model")),
        fingerprint=backend.backend_fingerprint if backend else None,
        refused=refused,
    )


def turn_body(body: Mapping[str, Any]) -> dict[str, Any]:
    """A Responses turn's backend body as its key sees it. A cache reference names the history by what it
    holds (its token count, prefix digest and fingerprint), not by the handle that holds it, and asking
    for a new handle changes nothing generated."""
    reference = body.get("prompt_cache")
    if not isinstance(reference, dict):
        return dict(body)
    held = {name: value for name, value in reference.items() if name not in ("ref", "register")}
    rest = {name: value for name, value in body.items() if name != "prompt_cache"}
    return {**rest, "prompt_cache": held} if held else rest


def replayed(endpoint: Endpoint, stored: Mapping[str, Any], new_id: str, created: int) -> dict[str, Any]:
    """A stored reply answered again: a new id and creation time, and every prompt token counted as
    cached (none was computed)."""
    reply = copy.deepcopy(dict(stored))
    reply["id"], reply["created"] = new_id, created
    usage = reply.get("usage")
    if isinstance(usage, dict):
        details = usage.get("prompt_tokens_details")
        usage["prompt_tokens_details"] = {
            **(details if isinstance(details, dict) else {}),
            "cached_tokens": usage.get("prompt_tokens") or 0,
        }
    return reply


def id_prefix(endpoint: Endpoint) -> str:
    return "chatcmpl-" if endpoint is Endpoint.CHAT else "cmpl-"
