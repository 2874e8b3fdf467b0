"""The wire form of the extension: the request's `prompt_cache` object, the typed misses, and the
`prompt_cache` object of a reply (convstate's docs/backend-protocol.md)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# In the order the backend checks them; each is an HTTP 409 of type prompt_cache_miss.
MISS_CODES = ("unknown_ref", "expired", "fingerprint_mismatch", "prefix_mismatch", "not_appendable")


class BadPromptCache(ValueError):
    """A malformed `prompt_cache` object: a 400 before anything else happens."""


class Miss(Exception):
    """A cache reference the backend will not continue from. Nothing changed on the backend; the caller
    resends the turn with its whole history."""

    def __init__(self, code: str, message: str) -> None:
        assert code in MISS_CODES
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message

    def body(self) -> dict[str, Any]:
        # `code` is a string here, unlike vLLM's integer codes; `type` tells the two apart.
        return {
            "error": {
                "message": self.message,
                "type": "prompt_cache_miss",
                "param": "prompt_cache",
                "code": self.code,
            }
        }


@dataclass(frozen=True, slots=True)
class Seed:
    """A prefix given as the token ids an earlier turn was generated from and generated, in place of a
    handle: its prompt without the generation prompt, or (`covers_output`) its prompt, its output and
    what the template puts after a message."""

    prompt_token_ids: list[int]
    output_token_ids: list[int]
    covers_output: bool


@dataclass(frozen=True, slots=True)
class CacheRequest:
    ref: str | None
    tokens: int | None
    prefix_hash: str | None
    fingerprint: str | None
    register: bool
    seed: Seed | None = None


def _field(raw: dict[str, Any], key: str, kind: type, what: str) -> Any:
    value = raw.get(key)
    if value is not None and (not isinstance(value, kind) or (kind is int and isinstance(value, bool))):
        raise BadPromptCache(f"`prompt_cache.{key}` must be {what}")
    return value


def parse_cache_request(raw: Any) -> CacheRequest:
    if not isinstance(raw, dict):
        raise BadPromptCache("`prompt_cache` must be an object")
    ref = _field(raw, "ref", str, "a string")
    tokens = _field(raw, "tokens", int, "an integer")
    prefix_hash = _field(raw, "prefix_hash", str, "a string")
    fingerprint = _field(raw, "fingerprint", str, "a string")
    register = _field(raw, "register", bool, "a boolean")
    if ref is not None and (tokens is None or prefix_hash is None or fingerprint is None):
        raise BadPromptCache("`prompt_cache` with a `ref` needs `tokens`, `prefix_hash` and `fingerprint`")
    seed = _seed(raw)
    if seed is not None and (ref is not None or fingerprint is None):
        raise BadPromptCache("`prompt_cache.seed` needs `fingerprint` and excludes `ref`")
    return CacheRequest(ref, tokens, prefix_hash, fingerprint, bool(register), seed)


def _token_ids(raw: dict[str, Any], key: str) -> list[int]:
    ids = raw.get(key)
    # By type, not isinstance: a bool is not a token id. (A whole history's ids: map and set run in C.)
    if not isinstance(ids, list) or not set(map(type, ids)) <= {int}:
        raise BadPromptCache(f"`prompt_cache.seed.{key}` must be a list of integers")
    return ids


def _seed(raw: dict[str, Any]) -> Seed | None:
    seed = _field(raw, "seed", dict, "an object")
    if seed is None:
        return None
    covers_output = seed.get("covers_output")
    if not isinstance(covers_output, bool):
        raise BadPromptCache("`prompt_cache.seed.covers_output` must be a boolean")
    return Seed(_token_ids(seed, "prompt_token_ids"), _token_ids(seed, "output_token_ids"), covers_output)
