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


def decide(inputs: DecisionInputs) -> Decision:
    def full(reason: Reason, detail: str | None = None) -> Decision:
        return Decision(Path.FULL, reason, detail)

    if inputs.mode is BackendMode.FULL:
        return full(Reason.MODE_FULL)
    if not inputs.has_parent:
        return full(Reason.NO_PARENT)
    if not inputs.store:
        return full(Reason.STORE_FALSE)
    parent = inputs.parent
    if parent is None:
        return full(Reason.NO_RECORD)
    if not inputs.parent_completed:
        # A failed, cancelled or cut-off turn: what the backend holds need not be what history says.
        return full(Reason.PARENT_NOT_COMPLETED)
    if not parent.valid or (
        inputs.invalidated_since is not None and inputs.invalidated_since >= parent.created_at
    ):
        return full(Reason.INVALIDATED)
    if parent.conversation_version != inputs.conversation_version:
        return full(Reason.HISTORY_EDITED)
    if parent.handle_ref is None or parent.handle_epoch is None or parent.handle_expires_at is None:
        return full(Reason.NO_HANDLE)
    if parent.covers_output is None or not parent.safe_tokens or parent.prefix_hash is None:
        return full(Reason.NOT_SAFE_BOUNDARY)
    if inputs.backend_epoch is None:
        return full(Reason.BACKEND_UNKNOWN)
    if inputs.backend_epoch != parent.handle_epoch:
        return full(Reason.BACKEND_EPOCH_CHANGED)
    if parent.handle_expires_at <= inputs.now:
        return full(Reason.HANDLE_EXPIRED)
    if parent.fingerprint_parts is None:
        return full(Reason.FINGERPRINT_UNKNOWN)
    difference = first_part_difference(parent.fingerprint_parts, inputs.current_parts)
    if difference is not None:
        part, unknown = difference
        if unknown:
            return full(Reason.FINGERPRINT_UNKNOWN, part)
        reason = _PART_REASONS.get(part)
        return full(reason) if reason else full(Reason.FINGERPRINT_MISMATCH, part)
    path = Path.AFFINITY if inputs.mode is BackendMode.AFFINITY else Path.CACHE_REF
    return Decision(path, Reason.CANARY if inputs.canary else Reason.HIT)


def truncated(dropped_segments: int) -> Decision:
    """truncation=auto dropped the oldest history to fit the context window: a history edit, so the
    handle registered for this turn must not be offered to the next one."""
    return Decision(Path.FULL, Reason.TRUNCATED, str(dropped_segments))


def backend_miss(code: str) -> Decision:
    """The backend refused the handle; the turn was re-sent in full within the same request."""
    return Decision(Path.FULL, Reason.BACKEND_MISS, code)
