"""Scoped invalidations as an in-memory index: which cutoff, if any, applies to a parent turn's record.

An invalidation is one row whatever it covers; each replica keeps every row in this index and asks it,
per turn, for the latest cutoff over the scopes the parent falls in (a handful of dict lookups, no SQL).
A record whose turn started at or before the cutoff is stale. The cutoff is the invalidation's time plus
`window`: a replica may decide from a view up to `max lag` old, so a turn that started just after the
invalidation may still have continued a stale handle, and its own record must be stale too. Being too
wide costs a full resend; too narrow would reuse a handle the operator invalidated.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

from service.domain.fingerprint import PARTS, combined_fingerprint


class Scope(StrEnum):
    # What an invalidation covers: records of one response and its descendants, one conversation, one
    # tenant, one model, one fingerprint (combined, or any one part), or every record.
    RESPONSE = "response"
    CONVERSATION = "conversation"
    TENANT = "tenant"
    MODEL = "model"
    FINGERPRINT = "fingerprint"
    ALL = "all"
    # Changes every replica must drop from its caches, in the same feed (and audit log).
    TENANT_CONFIG = "tenant_config"
    API_KEY = "api_key"


HANDLE_SCOPES = frozenset(
    {Scope.RESPONSE, Scope.CONVERSATION, Scope.TENANT, Scope.MODEL, Scope.FINGERPRINT, Scope.ALL}
)


@dataclass(frozen=True, slots=True)
class Rule:
    id: int
    scope: Scope
    key: str | None
    lineage_root: str | None
    depth: int | None
    created_at: float


@dataclass(frozen=True, slots=True)
class Subject:
    """What a parent turn's record is, as far as scopes go."""

    tenant: str
    model: str
    conversation_id: str | None
    lineage_root: str | None
    depth: int
    fingerprint_parts: Mapping[str, str | None]


def fingerprint_key(part: str | None, value: str) -> str:
    """The key of a fingerprint-scope rule: `part=hash` for one part, the bare hash for the combined one."""
    if part is None:
        return value
    if part not in PARTS:
        raise ValueError(f"unknown fingerprint part {part!r}; one of {', '.join(PARTS)}")
    return f"{part}={value}"


def _later(current: float | None, candidate: float | None) -> float | None:
    if candidate is None:
        return current
    return candidate if current is None or candidate > current else current


class InvalidationIndex:
    def __init__(self, window: float) -> None:
        self.window = window
        self._all: float | None = None
        self._keyed: dict[tuple[Scope, str], float] = {}
        # Response scope: lineage root -> {depth: cutoff}; covers records of that depth and deeper.
        self._lineages: dict[str, dict[int, float]] = {}

    def add(self, rule: Rule) -> None:
        if rule.scope not in HANDLE_SCOPES:
            return
        cutoff = rule.created_at + self.window
        if rule.scope is Scope.ALL:
            self._all = _later(self._all, cutoff)
        elif rule.scope is Scope.RESPONSE:
            if rule.lineage_root is not None and rule.depth is not None:
                depths = self._lineages.setdefault(rule.lineage_root, {})
                depths[rule.depth] = max(cutoff, depths.get(rule.depth, cutoff))
        elif rule.key is not None:
            self._keyed[(rule.scope, rule.key)] = max(cutoff, self._keyed.get((rule.scope, rule.key), cutoff))

    def cutoff(self, subject: Subject) -> float | None:
        """The latest cutoff of any rule covering the subject; None if none does."""
        found = self._all
        keyed = self._keyed
        if keyed:
            candidates = [(Scope.TENANT, subject.tenant), (Scope.MODEL, subject.model)]
            if subject.conversation_id is not None:
                candidates.append((Scope.CONVERSATION, subject.conversation_id))
            candidates += [
                (Scope.FINGERPRINT, f"{part}={value}")
                for part, value in subject.fingerprint_parts.items()
                if value is not None
            ]
            combined = combined_fingerprint(subject.fingerprint_parts)
            if combined is not None:
                candidates.append((Scope.FINGERPRINT, combined))
            for candidate in candidates:
                found = _later(found, keyed.get(candidate))
        if subject.lineage_root is not None:
            for depth, cutoff in self._lineages.get(subject.lineage_root, {}).items():
                if depth <= subject.depth:
                    found = _later(found, cutoff)
        return found


def handle_state(
    *,
    record_status: str | None,
    invalid_reason: str | None,
    handle_ref: str | None,
    handle_expires_at: float | None,
    record_created_at: float | None,
    cutoff: float | None,
    now: float,
) -> str:
    """What an operator needs to know of a turn's handle: `none`, `valid`, `expired`,
    `invalidated:<reason>` (the record's own) or `invalidated:scope` (a scoped invalidation covers it)."""
    if record_status is None or handle_ref is None or record_created_at is None:
        return "none"
    if record_status != "valid":
        return f"invalidated:{invalid_reason or 'unknown'}"
    if cutoff is not None and cutoff >= record_created_at:
        return "invalidated:scope"
    if handle_expires_at is None or handle_expires_at <= now:
        return "expired"
    return "valid"
