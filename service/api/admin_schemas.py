"""Request and response bodies of the admin API (they document it in /openapi.json). Keys and audit rows
are answered as the store holds them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from service.domain.auth import Role
from service.store.invalidations import StoredInvalidation
from service.store.keys import StoredKey

TenantId = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
Reason = Field(min_length=1, max_length=500)
TtlDays = Field(default=None, gt=0, le=36500)


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CreateTenantBody(Body):
    id: str = TenantId
    response_ttl_days: float | None = TtlDays


class UpdateTenantBody(Body):
    """Only the fields sent change."""

    response_ttl_days: float | None = TtlDays
    replay_cache: bool | None = Field(
        default=None, description="its requests use the replay cache by default"
    )


class ReasonBody(Body):
    reason: str = Reason


class CreateKeyBody(Body):
    tenant: str = TenantId
    role: Role = Role.USER
    name: str = Field(default="", max_length=128)


class InvalidateBody(Body):
    scope: Literal["response", "conversation", "tenant", "model", "fingerprint", "all"]
    key: str | None = Field(
        default=None,
        max_length=200,
        description="response id, conversation id, tenant id, model name or fingerprint hash; none for all",
    )
    part: str | None = Field(
        default=None, description="fingerprint scope: the part the hash is of (omit for the combined hash)"
    )
    reason: str = Reason


class Tenant(BaseModel):
    id: str
    created_at: float
    response_ttl_days: float | None = Field(description="None: the service default")
    salt_id: str = Field(description="names the current cache salt without revealing it")
    replay_cache: bool = Field(description="its requests use the replay cache unless they say otherwise")


class Tenants(BaseModel):
    data: list[Tenant]


@dataclass(slots=True)
class CreatedKey(StoredKey):
    key: str = field(metadata={"description": "the secret: shown once, stored only as its hash"})


class Keys(BaseModel):
    data: list[StoredKey]


class Decision(BaseModel):
    path: str
    reason: str


class Handle(BaseModel):
    state: str = Field(description="none, valid, expired, invalidated:<reason> or invalidated:scope")
    ref: str | None
    endpoint: str | None
    epoch: str | None
    expires_at: float | None


class Turn(BaseModel):
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
    decision: Decision | None
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
    append_safe: bool | None = Field(
        description="observed from the token artifacts: the parent's prompt + output ids are a prefix of "
        "this prompt (null: no artifact yet, or another fingerprint)"
    )
    divergence: int | None = Field(description="where they differ when not append-safe")


class Inspection(BaseModel):
    object: Literal["lineage", "conversation"]
    id: str
    turns: list[Turn]


class Invalidations(BaseModel):
    data: list[StoredInvalidation]
    has_more: bool


class StatsGroup(BaseModel):
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


class Stats(BaseModel):
    total: StatsGroup
    groups: list[StatsGroup]


class Divergence(BaseModel):
    """Where this turn's prompt ids leave its parent's prompt + output ids, and the text around it."""

    parent_id: str
    parent_tokens: int = Field(description="the parent's prompt + output ids")
    comparable: bool = Field(description="same known fingerprint: a divergence is then the template's")
    append_safe: bool
    divergence: int | None = Field(description="the first differing index; null when append-safe")
    window_start: int | None
    parent_text: str | None = Field(description="the parent's ids around the divergence, detokenized")
    text: str | None = Field(description="this prompt's ids around the divergence, detokenized")


class Artifact(BaseModel):
    object: Literal["token_artifact"] = "token_artifact"
    response_id: str
    tenant: str
    model: str
    template: str | None
    parent_id: str | None
    fingerprint: str | None
    decision: str
    prompt_tokens: int
    output_tokens: int
    prompt_token_ids_start: int = Field(
        description="0 when prompt_token_ids is the whole prompt; else the index of its first id (an "
        "artifact the whole prompt is rebuilt from is missing)"
    )
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    append_safe: bool | None = Field(description="as the writer observed it; null when not comparable")
    divergence: Divergence | None = Field(
        description="null when the parent has no artifact or either prompt is not whole"
    )
    diagnostic: dict[str, Any] | None = Field(description="set when it contradicted its parent's claim")
    created_at: float
    expires_at: float


class AppendSafetyGroup(BaseModel):
    model: str
    template: str | None = Field(description="the chat_template fingerprint part")
    observed: int
    append_safe: int
    rate: float
    contradicted: int


class AppendSafety(BaseModel):
    data: list[AppendSafetyGroup]


class RetentionRun(BaseModel):
    deleted_responses: int
    deleted_artifacts: int
    deleted_stream_events: int
