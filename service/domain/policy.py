"""The decision: may this turn continue from its parent's backend handle, or must it send everything?

One pure function over explicit inputs. Every outcome carries a typed reason. Anything unknown, missing or
inconsistent decides FULL: a missed reuse costs a few milliseconds, a wrong one silently changes what the
model sees.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

from service.domain.fingerprint import PARTS


class BackendMode(StrEnum):
    """How the service talks to the backend (CONVSTATE_BACKEND_MODE)."""

    FULL = "full"
    CACHE_REF = "cache_ref"
    AFFINITY = "affinity"


class Path(StrEnum):
    FULL = "full"
    CACHE_REF = "cache_ref"
    AFFINITY = "affinity"


class Reason(StrEnum):
    HIT = "hit"
    CANARY = "canary"
    MODE_FULL = "mode_full"
    NO_PARENT = "no_parent"
    STORE_FALSE = "store_false"
    NO_RECORD = "no_record"
    PARENT_NOT_COMPLETED = "parent_not_completed"
    NO_HANDLE = "no_handle"
    INVALIDATED = "invalidated"
    HISTORY_EDITED = "history_edited"
    BACKEND_UNKNOWN = "backend_unknown"
    BACKEND_EPOCH_CHANGED = "backend_epoch_changed"
    HANDLE_EXPIRED = "handle_expired"
    NOT_SAFE_BOUNDARY = "not_safe_boundary"
    FINGERPRINT_UNKNOWN = "fingerprint_unknown"
    INSTRUCTIONS_CHANGED = "instructions_changed"
    TOOLS_CHANGED = "tools_changed"
    REASONING_CHANGED = "reasoning_changed"
    FINGERPRINT_MISMATCH = "fingerprint_mismatch"
    BACKEND_MISS = "backend_miss"
    TRUNCATED = "truncated"
    NO_SESSION_TOKEN = "no_session_token"
    RESEED = "reseed"


_PART_REASONS = {
    "instructions": Reason.INSTRUCTIONS_CHANGED,
    "tools": Reason.TOOLS_CHANGED,
    "reasoning": Reason.REASONING_CHANGED,
}


@dataclass(frozen=True, slots=True)
class Decision:
    path: Path
    reason: Reason
    detail: str | None = None  # the fingerprint part, or the backend's miss code

    @property
    def label(self) -> str:
        """`hit`, `fingerprint_mismatch:tokenizer`, `backend_miss:unknown_ref`, ..."""
        return f"{self.reason}:{self.detail}" if self.detail else str(self.reason)

    @property
    def header(self) -> str:
        return f"{self.path}; reason={self.label}"


@dataclass(frozen=True, slots=True)
class ParentPrefix:
    """What the parent turn's prefix record says about its handle."""

    valid: bool
    fingerprint_parts: Mapping[str, str | None] | None
    handle_ref: str | None
    backend_fingerprint: str | None
    handle_epoch: str | None
    handle_expires_at: float | None
    safe_tokens: int | None
    prefix_hash: str | None
    covers_output: bool | None
    created_at: float
    conversation_version: int | None
    # llm-d's session token from the parent's reply: the replica that holds the lineage's KV.
    session_token: str | None = None


@dataclass(frozen=True, slots=True)
class DecisionInputs:
    mode: BackendMode
    has_parent: bool
    store: bool
    parent: ParentPrefix | None
    parent_completed: bool
    current_parts: Mapping[str, str | None]
    backend_epoch: str | None
    now: float
    invalidated_since: float | None = None
    conversation_version: int | None = None
    canary: bool = False


def first_part_difference(
    stored: Mapping[str, str | None], current: Mapping[str, str | None]
) -> tuple[str, bool] | None:
    """(part, unknown) for the first part that is unknown on either side or differs; None if all equal."""
    for name in PARTS:
        before, now = stored.get(name), current.get(name)
        if before is None or now is None:
            return name, True
        if before != now:
            return name, False
    return None


def _full(reason: Reason, detail: str | None = None) -> Decision:
    return Decision(Path.FULL, reason, detail)


def _lineage(inputs: DecisionInputs) -> Decision | None:
    """FULL unless the turn continues a stored, completed, valid and unedited parent record."""
    if inputs.mode is BackendMode.FULL:
        return _full(Reason.MODE_FULL)
    if not inputs.has_parent:
        return _full(Reason.NO_PARENT)
    if not inputs.store:
        return _full(Reason.STORE_FALSE)
    parent = inputs.parent
    if parent is None:
        return _full(Reason.NO_RECORD)
    if not inputs.parent_completed:
        # A failed, cancelled or cut-off turn: what the backend holds need not be what history says.
        return _full(Reason.PARENT_NOT_COMPLETED)
    if not parent.valid or (
        inputs.invalidated_since is not None and inputs.invalidated_since >= parent.created_at
    ):
        return _full(Reason.INVALIDATED)
    if parent.conversation_version != inputs.conversation_version:
        return _full(Reason.HISTORY_EDITED)
    return None


def _handle(inputs: DecisionInputs, parent: ParentPrefix) -> Decision | None:
    """FULL unless the parent's handle is live in the backend's current epoch."""
    if parent.handle_ref is None or parent.handle_epoch is None or parent.handle_expires_at is None:
        return _full(Reason.NO_HANDLE)
    if parent.covers_output is None or not parent.safe_tokens or parent.prefix_hash is None:
        return _full(Reason.NOT_SAFE_BOUNDARY)
    if inputs.backend_epoch is None:
        return _full(Reason.BACKEND_UNKNOWN)
    if inputs.backend_epoch != parent.handle_epoch:
        return _full(Reason.BACKEND_EPOCH_CHANGED)
    if parent.handle_expires_at <= inputs.now:
        return _full(Reason.HANDLE_EXPIRED)
    return None


def _fingerprint(inputs: DecisionInputs, parent: ParentPrefix) -> Decision | None:
    """FULL unless every fingerprint part is known on both sides and equal."""
    if parent.fingerprint_parts is None:
        return _full(Reason.FINGERPRINT_UNKNOWN)
    difference = first_part_difference(parent.fingerprint_parts, inputs.current_parts)
    if difference is None:
        return None
    part, unknown = difference
    if unknown:
        return _full(Reason.FINGERPRINT_UNKNOWN, part)
    reason = _PART_REASONS.get(part)
    return _full(reason) if reason else _full(Reason.FINGERPRINT_MISMATCH, part)


def decide(inputs: DecisionInputs) -> Decision:
    """`cache_ref` continues the parent's handle; `affinity` sends everything with the parent's llm-d
    session token, so the turn lands on the replica holding the lineage's KV (the token is a routing
    hint, not a claim about tokens: no handle is needed, and a backend restart only costs the KV)."""
    refused = _lineage(inputs)
    if refused is not None:
        return refused
    parent = inputs.parent
    assert parent is not None  # _lineage refuses a missing record
    if inputs.mode is BackendMode.AFFINITY:
        if parent.session_token is None:
            return _full(Reason.NO_SESSION_TOKEN)
        refused = _fingerprint(inputs, parent)
    else:
        refused = _handle(inputs, parent) or _fingerprint(inputs, parent)
    if refused is not None:
        return refused
    path = Path.AFFINITY if inputs.mode is BackendMode.AFFINITY else Path.CACHE_REF
    return Decision(path, Reason.CANARY if inputs.canary else Reason.HIT)


# Decisions after which the parent's prefix may be rebuilt from its token ids: its handle was refused
# (a miss) or is known to be gone, while everything else about the lineage still holds.
_RESEED_AFTER = frozenset({Reason.HIT, Reason.CANARY, Reason.BACKEND_EPOCH_CHANGED, Reason.HANDLE_EXPIRED})


def reseedable(inputs: DecisionInputs, decision: Decision) -> bool:
    """On the cache path, whether the parent's record may be continued from its ids instead of its
    handle: the handle alone failed (every lineage and fingerprint check holds)."""
    parent = inputs.parent
    return (
        inputs.mode is BackendMode.CACHE_REF
        and decision.reason in _RESEED_AFTER
        and parent is not None
        and parent.covers_output is not None
        and _fingerprint(inputs, parent) is None
    )


def truncated(dropped_segments: int) -> Decision:
    """truncation=auto dropped the oldest history to fit the context window: a history edit, so the
    handle registered for this turn must not be offered to the next one."""
    return Decision(Path.FULL, Reason.TRUNCATED, str(dropped_segments))


def backend_miss(code: str) -> Decision:
    """The backend refused the handle; the turn was re-sent in full within the same request."""
    return Decision(Path.FULL, Reason.BACKEND_MISS, code)


def reseeded(after: Decision) -> Decision:
    """The parent's prefix was rebuilt on the backend from its stored token ids (the handle failed or
    was gone: `after`) and the turn sent only its new messages."""
    return Decision(Path.CACHE_REF, Reason.RESEED, after.label)
