"""Golden values pin the canonical encodings: a change here must bump KEY_FORMAT_VERSION."""

from __future__ import annotations

import dataclasses

from service.domain.fingerprint import (
    BackendModelInfo,
    RequestRenderSettings,
    canonical_bytes,
    combined_fingerprint,
    fingerprint_parts,
    part_hash,
)
from service.domain.prefix import TokenDigest, pack_tokens, token_digest

BACKEND = BackendModelInfo(
    model="m",
    revision="r1",
    tokenizer="tok",
    renderer="ref/1",
    chat_template="tpl",
    lora=None,
    block_size=16,
    epoch="e",
    backend_fingerprint="f",
    max_model_len=1024,
)
REQUEST = RequestRenderSettings(
    instructions="Be brief.",
    tools=[{"type": "function", "name": "f"}],
    tool_choice="auto",
    reasoning={"effort": "low"},
    chat_template_kwargs=None,
    cache_salt_id="salt",
)


def test_canonical_bytes_are_order_independent_and_compact() -> None:
    assert canonical_bytes({"b": 1, "a": [1, "é"]}) == '{"a":[1,"é"],"b":1}'.encode()


def test_token_digest_golden() -> None:
    assert pack_tokens([1, 256]) == b"\x01\x00\x00\x00\x00\x01\x00\x00"
    assert token_digest([]) == "99aa06d3014798d86001c324468d497f"
    assert token_digest([1, 2, 3]) == token_digest(iter([1, 2, 3]))
    digest = TokenDigest()
    digest.extend([1, 2])
    fork = digest.copy()
    digest.extend([3])
    assert digest.hexdigest() == token_digest([1, 2, 3]) and digest.count == 3
    assert fork.hexdigest() == token_digest([1, 2])


def test_part_hash_golden() -> None:
    assert part_hash("instructions", "Be brief.") == "63443444a898174fd3b1c1836304ba6a"


def test_fingerprint_parts_golden_and_sensitive() -> None:
    parts = fingerprint_parts(BACKEND, REQUEST)
    assert combined_fingerprint(parts) == "b18f73bbaa9c3fa796c13108335c0840"
    changed = fingerprint_parts(BACKEND, dataclasses.replace(REQUEST, instructions="Be long."))
    assert [name for name in parts if parts[name] != changed[name]] == ["instructions"]


def test_unknown_backend_parts_leave_the_fingerprint_unknown() -> None:
    parts = fingerprint_parts(
        BackendModelInfo("m", None, None, None, None, None, None, None, None, None), REQUEST
    )
    assert parts["tokenizer"] is None and combined_fingerprint(parts) is None
