"""The admin API's JSON objects, as typed dictionaries (what the service's /openapi.json documents)."""

from __future__ import annotations

from typing import Any, TypedDict


class Tenant(TypedDict):
    id: str
    created_at: float
    response_ttl_days: float | None
    salt_id: str
    replay_cache: bool


class Tenants(TypedDict):
    data: list[Tenant]


class Key(TypedDict):
    id: str
    tenant: str
    role: str
    name: str
    created_at: float
    revoked_at: float | None


class CreatedKey(Key):
    key: str


class Keys(TypedDict):
    data: list[Key]


class DecisionObject(TypedDict):
    path: str
    reason: str


class Handle(TypedDict):
    state: str
    ref: str | None
    endpoint: str | None
    epoch: str | None
    expires_at: float | None


class Turn(TypedDict):
    id: str
    tenant: str
    model: str
    status: str
    conversation_id: str | None
    lineage_root: str | None
    depth: int
    created_at: float
    expires_at: float
    expired: bool
    deleted: bool
    decision: DecisionObject | None
    prompt_tokens: int | None
    cached_tokens: int | None
    bytes_sent: int | None
    prefix_hash: str | None
    turn_tokens: int | None
    safe_boundary: bool | None
    safe_tokens: int | None
    covers_output: bool | None
    fingerprint: str | None
    fingerprint_parts: dict[str, Any] | None
    handle: Handle
    append_safe: bool | None
    divergence: int | None


class Inspection(TypedDict):
    object: str
    id: str
    turns: list[Turn]


class Invalidation(TypedDict):
    id: int
    scope: str
    key: str | None
    lineage_root: str | None
    depth: int | None
    reason: str
    actor: str
    created_at: float


class Invalidations(TypedDict):
    data: list[Invalidation]
    has_more: bool


class StatsGroup(TypedDict):
    tenant: str | None
    model: str | None
    turns: int
    reused: int
    hit_rate: float | None
    fallbacks: int
    prompt_tokens: int
    cached_tokens: int
    bytes_sent: int
    decisions: dict[str, int]


class Stats(TypedDict):
    total: StatsGroup
    groups: list[StatsGroup]


class Divergence(TypedDict):
    parent_id: str
    parent_tokens: int
    comparable: bool
    append_safe: bool
    divergence: int | None
    window_start: int | None
    parent_text: str | None
    text: str | None


class Artifact(TypedDict):
    object: str
    response_id: str
    tenant: str
    model: str
    template: str | None
    parent_id: str | None
    fingerprint: str | None
    decision: str
    prompt_tokens: int
    output_tokens: int
    prompt_token_ids_start: int
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    append_safe: bool | None
    divergence: Divergence | None
    diagnostic: dict[str, Any] | None
    created_at: float
    expires_at: float


class AppendSafetyGroup(TypedDict):
    model: str
    template: str | None
    observed: int
    append_safe: int
    rate: float
    contradicted: int


class AppendSafety(TypedDict):
    data: list[AppendSafetyGroup]


class RetentionRun(TypedDict):
    deleted_responses: int
    deleted_artifacts: int
    deleted_stream_events: int


class ReplayModelStats(TypedDict):
    tenant: str
    model: str
    entries: int
    bytes: int
    oldest: float
    newest: float


class ReplayStats(TypedDict):
    data: list[ReplayModelStats]
    entries: int
    bytes: int


class ReplayEntry(TypedDict, total=False):
    """A replay-cache entry; `request` and `result` only in an export (`whole`)."""

    tenant: str
    key: str
    endpoint: str
    model: str
    fingerprint: str | None
    status: str
    bytes: int
    created_at: float
    expires_at: float
    request: dict[str, Any]
    result: dict[str, Any]


class ReplayEntries(TypedDict):
    data: list[ReplayEntry]
    next: str | None


class ReplayDeleted(TypedDict):
    deleted: int


class ReplayImported(TypedDict):
    imported: int
