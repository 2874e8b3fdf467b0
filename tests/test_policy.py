"""The decision, table-driven: one row per reason, and fail-closed on anything unknown."""

from __future__ import annotations

import dataclasses

import pytest

from service.domain.fingerprint import PARTS
from service.domain.policy import (
    BackendMode,
    Decision,
    DecisionInputs,
    ParentPrefix,
    Path,
    Reason,
    backend_miss,
    decide,
    reseedable,
    reseeded,
    truncated,
)

NOW = 1_000_000.0
PARTS_OK = {name: f"h-{name}" for name in PARTS}
PARENT = ParentPrefix(
    valid=True,
    fingerprint_parts=PARTS_OK,
    handle_ref="pc_1",
    backend_fingerprint="fp-1",
    handle_epoch="epoch-1",
    handle_expires_at=NOW + 60,
    safe_tokens=100,
    prefix_hash="ab" * 16,
    covers_output=True,
    created_at=NOW - 10,
    conversation_version=None,
    session_token="bGxtLWQvcG9kLTA=",
)
BASE = DecisionInputs(
    mode=BackendMode.CACHE_REF,
    has_parent=True,
    store=True,
    parent=PARENT,
    parent_completed=True,
    current_parts=PARTS_OK,
    backend_epoch="epoch-1",
    now=NOW,
)


AFFINITY = dataclasses.replace(BASE, mode=BackendMode.AFFINITY)


def _with_parent(**changes: object) -> DecisionInputs:
    return dataclasses.replace(BASE, parent=dataclasses.replace(PARENT, **changes))  # type: ignore[arg-type]


def _with_part(name: str, value: str | None) -> DecisionInputs:
    return dataclasses.replace(BASE, current_parts={**PARTS_OK, name: value})


CASES: list[tuple[str, DecisionInputs, Path, str]] = [
    ("hit", BASE, Path.CACHE_REF, "hit"),
    ("hit, handle before the parent's output", _with_parent(covers_output=False), Path.CACHE_REF, "hit"),
    ("affinity hit", dataclasses.replace(BASE, mode=BackendMode.AFFINITY), Path.AFFINITY, "hit"),
    # The session token routes; it needs no handle (llm-d with an unmodified vLLM has none).
    (
        "affinity without a handle",
        dataclasses.replace(AFFINITY, parent=dataclasses.replace(PARENT, handle_ref=None, handle_epoch=None)),
        Path.AFFINITY,
        "hit",
    ),
    (
        "affinity without a session token",
        dataclasses.replace(AFFINITY, parent=dataclasses.replace(PARENT, session_token=None)),
        Path.FULL,
        "no_session_token",
    ),
    (
        "affinity after an invalidation",
        dataclasses.replace(AFFINITY, parent=dataclasses.replace(PARENT, valid=False)),
        Path.FULL,
        "invalidated",
    ),
    (
        "affinity after an edit",
        dataclasses.replace(AFFINITY, conversation_version=2),
        Path.FULL,
        "history_edited",
    ),
    (
        "affinity after a fingerprint change",
        dataclasses.replace(AFFINITY, current_parts={**PARTS_OK, "chat_template": "other"}),
        Path.FULL,
        "fingerprint_mismatch:chat_template",
    ),
    ("canary", dataclasses.replace(BASE, canary=True), Path.CACHE_REF, "canary"),
    ("mode full", dataclasses.replace(BASE, mode=BackendMode.FULL), Path.FULL, "mode_full"),
    (
        "parent failed or cancelled",
        dataclasses.replace(BASE, parent_completed=False),
        Path.FULL,
        "parent_not_completed",
    ),
    ("no parent", dataclasses.replace(BASE, has_parent=False, parent=None), Path.FULL, "no_parent"),
    ("store false", dataclasses.replace(BASE, store=False), Path.FULL, "store_false"),
    ("parent has no record", dataclasses.replace(BASE, parent=None), Path.FULL, "no_record"),
    ("record invalidated", _with_parent(valid=False), Path.FULL, "invalidated"),
    (
        "scope invalidated after",
        dataclasses.replace(BASE, invalidated_since=NOW - 5),
        Path.FULL,
        "invalidated",
    ),
    (
        "scope invalidated before",
        dataclasses.replace(BASE, invalidated_since=NOW - 50),
        Path.CACHE_REF,
        "hit",
    ),
    ("conversation edited", dataclasses.replace(BASE, conversation_version=3), Path.FULL, "history_edited"),
    ("no handle", _with_parent(handle_ref=None), Path.FULL, "no_handle"),
    ("no handle epoch", _with_parent(handle_epoch=None), Path.FULL, "no_handle"),
    ("no safe boundary", _with_parent(safe_tokens=0), Path.FULL, "not_safe_boundary"),
    ("boundary unknown", _with_parent(covers_output=None), Path.FULL, "not_safe_boundary"),
    ("backend unknown", dataclasses.replace(BASE, backend_epoch=None), Path.FULL, "backend_unknown"),
    (
        "backend restarted",
        dataclasses.replace(BASE, backend_epoch="epoch-2"),
        Path.FULL,
        "backend_epoch_changed",
    ),
    ("handle expired", _with_parent(handle_expires_at=NOW), Path.FULL, "handle_expired"),
    ("record without parts", _with_parent(fingerprint_parts=None), Path.FULL, "fingerprint_unknown"),
    ("instructions", _with_part("instructions", "other"), Path.FULL, "instructions_changed"),
    ("tools", _with_part("tools", "other"), Path.FULL, "tools_changed"),
    ("reasoning", _with_part("reasoning", "other"), Path.FULL, "reasoning_changed"),
    ("tokenizer", _with_part("tokenizer", "other"), Path.FULL, "fingerprint_mismatch:tokenizer"),
    ("chat template", _with_part("chat_template", "other"), Path.FULL, "fingerprint_mismatch:chat_template"),
    ("cache salt", _with_part("cache_salt", "other"), Path.FULL, "fingerprint_mismatch:cache_salt"),
    ("key format", _with_part("key_format", "other"), Path.FULL, "fingerprint_mismatch:key_format"),
    ("unknown current part", _with_part("renderer", None), Path.FULL, "fingerprint_unknown:renderer"),
    (
        "unknown stored part",
        _with_parent(fingerprint_parts={**PARTS_OK, "lora": None}),
        Path.FULL,
        "fingerprint_unknown:lora",
    ),
    ("missing stored part", _with_parent(fingerprint_parts={}), Path.FULL, "fingerprint_unknown:key_format"),
]


@pytest.mark.parametrize(("inputs", "path", "label"), [case[1:] for case in CASES], ids=[c[0] for c in CASES])
def test_decision(inputs: DecisionInputs, path: Path, label: str) -> None:
    decision = decide(inputs)
    assert (decision.path, decision.label) == (path, label)


def test_every_reason_is_reachable() -> None:
    produced = {decide(case[1]).reason for case in CASES} | {
        backend_miss("unknown_ref").reason,
        truncated(2).reason,
        reseeded(backend_miss("unknown_ref")).reason,
    }
    assert produced == set(Reason)


def test_every_fingerprint_part_is_checked() -> None:
    for name in PARTS:
        assert decide(_with_part(name, "changed")).path is Path.FULL, name


def test_header_format() -> None:
    assert Decision(Path.CACHE_REF, Reason.HIT).header == "cache_ref; reason=hit"
    assert backend_miss("expired").header == "full; reason=backend_miss:expired"


@pytest.mark.parametrize(
    ("inputs", "expected"),
    [
        (BASE, True),  # a hit whose handle the backend then refuses
        (dataclasses.replace(BASE, backend_epoch="epoch-2"), True),
        (_with_parent(handle_expires_at=NOW), True),
        (
            dataclasses.replace(BASE, backend_epoch="epoch-2", current_parts={**PARTS_OK, "tokenizer": "x"}),
            False,
        ),
        (dataclasses.replace(BASE, backend_epoch="epoch-2", current_parts={**PARTS_OK, "lora": None}), False),
        (_with_parent(valid=False), False),
        (_with_parent(covers_output=None), False),
        (dataclasses.replace(BASE, conversation_version=3), False),
        (dataclasses.replace(BASE, backend_epoch=None), False),
        (AFFINITY, False),
    ],
)
def test_reseed_only_when_the_handle_alone_failed(inputs: DecisionInputs, expected: bool) -> None:
    assert reseedable(inputs, decide(inputs)) is expected


def test_a_reseed_says_what_it_replaced() -> None:
    assert reseeded(backend_miss("unknown_ref")).header == "cache_ref; reason=reseed:backend_miss:unknown_ref"
