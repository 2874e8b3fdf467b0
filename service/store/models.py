"""Tables. Postgres is the system of record; SQLite is the embedded default. Alembic creates them."""

from __future__ import annotations

from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Double,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    SmallInteger,
    String,
    Text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

JsonType = JSON().with_variant(JSONB(), "postgresql")
# A JSON column whose Python None is SQL NULL (JsonType stores it as JSON null), so IS NULL finds it.
NullableJson = JSON(none_as_null=True).with_variant(JSONB(none_as_null=True), "postgresql")
Id = String(64)


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {dict[str, Any]: JsonType, list[Any]: JsonType}


class Tenant(Base):
    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(Id, primary_key=True)
    # Per-tenant salt forwarded as vLLM's cache_salt: KV reuse never crosses tenants.
    cache_salt: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[float] = mapped_column(Double)
    # Days a response of this tenant lives; NULL: the service default (CONVSTATE_RESPONSE_TTL_DAYS).
    response_ttl_days: Mapped[float | None] = mapped_column(Double)
    # Opted in to the replay cache: its requests use it unless they say otherwise.
    replay_cache: Mapped[bool] = mapped_column(Boolean, default=False)


class ApiKey(Base):
    """A key is stored only as the SHA-256 of its secret; `id` is its public name (list, revoke)."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(Id, primary_key=True)
    key_hash: Mapped[str] = mapped_column(String(64))
    tenant: Mapped[str] = mapped_column(Id, ForeignKey("tenants.id"))
    role: Mapped[str] = mapped_column(String(16))  # user | admin
    name: Mapped[str] = mapped_column(String(128), default="")
    created_at: Mapped[float] = mapped_column(Double)
    revoked_at: Mapped[float | None] = mapped_column(Double)

    __table_args__ = (
        Index("ux_api_keys_hash", "key_hash", unique=True),
        Index("ix_api_keys_tenant", "tenant"),
    )


class Conversation(Base):
    __tablename__ = "conversations"

    id: Mapped[str] = mapped_column(Id, primary_key=True)
    tenant: Mapped[str] = mapped_column(Id)
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata", JsonType)
    next_position: Mapped[int] = mapped_column(BigInteger, default=0)
    # Bumped by every edit of the item list; a prefix record seeded at another version is stale.
    version: Mapped[int] = mapped_column(BigInteger, default=0)
    active_response_id: Mapped[str | None] = mapped_column(Id)
    lock_expires_at: Mapped[float | None] = mapped_column(Double)
    created_at: Mapped[float] = mapped_column(Double)
    deleted_at: Mapped[float | None] = mapped_column(Double)
    # The response of the last finished turn: the parent of the next one.
    head_response_id: Mapped[str | None] = mapped_column(Id)

    __table_args__ = (Index("ix_conversations_tenant", "tenant"),)


# The unique index on responses (thread, depth); store/turns.py recognizes a write it refused.
THREAD_INDEX = "ux_responses_thread"


class Response(Base):
    __tablename__ = "responses"

    id: Mapped[str] = mapped_column(Id, primary_key=True)
    tenant: Mapped[str] = mapped_column(Id)
    model: Mapped[str] = mapped_column(String(256))
    status: Mapped[str] = mapped_column(String(16))
    previous_response_id: Mapped[str | None] = mapped_column(Id, ForeignKey("responses.id"))
    conversation_id: Mapped[str | None] = mapped_column(Id, ForeignKey("conversations.id"))
    # The conversation's length when this turn began: its history is the conversation's items before it.
    conversation_start: Mapped[int | None] = mapped_column(BigInteger)
    # Number of ancestors: orders a lineage without walking it.
    depth: Mapped[int] = mapped_column(Integer)
    # The lineage's first response: "a response and its descendants" is (root, depth >= d), no walk.
    lineage_root: Mapped[str | None] = mapped_column(Id)
    # The first response of its thread (service/domain/threads.py): a run of the lineage with one
    # response per depth, whose items the history reads as one range. Unique with the depth, so of two
    # children of one parent only one continues its thread.
    thread: Mapped[str] = mapped_column(Id)
    instructions: Mapped[str | None] = mapped_column(Text)
    # The effective request settings (tools, sampling, text, reasoning, metadata, ...), as echoed.
    settings: Mapped[dict[str, Any]] = mapped_column(JsonType)
    usage: Mapped[dict[str, Any] | None] = mapped_column(JsonType)
    error: Mapped[dict[str, Any] | None] = mapped_column(JsonType)
    incomplete_details: Mapped[dict[str, Any] | None] = mapped_column(JsonType)
    store: Mapped[bool] = mapped_column(Boolean)
    background: Mapped[bool] = mapped_column(Boolean, default=False)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    # Held by the worker running a background response; an expired lease means the worker died.
    lease_expires_at: Mapped[float | None] = mapped_column(Double)
    created_at: Mapped[float] = mapped_column(Double)
    completed_at: Mapped[float | None] = mapped_column(Double)
    expires_at: Mapped[float] = mapped_column(Double)
    deleted_at: Mapped[float | None] = mapped_column(Double)

    __table_args__ = (
        Index("ix_responses_previous", "previous_response_id"),
        Index("ix_responses_expires_at", "expires_at"),
        Index("ix_responses_status_active", "status", postgresql_where="status IN ('queued', 'in_progress')"),
        Index("ix_responses_lineage", "lineage_root", "expires_at"),
        Index(THREAD_INDEX, "thread", "depth", unique=True),
    )


class Item(Base):
    __tablename__ = "items"

    id: Mapped[str] = mapped_column(Id, primary_key=True)
    tenant: Mapped[str] = mapped_column(Id)
    # The response whose request carried it (segment 0) or that produced it (segment 1); NULL for items
    # added to a conversation directly.
    response_id: Mapped[str | None] = mapped_column(Id, ForeignKey("responses.id", ondelete="CASCADE"))
    segment: Mapped[int] = mapped_column(SmallInteger)
    position: Mapped[int] = mapped_column(Integer)
    type: Mapped[str] = mapped_column(String(32))
    payload: Mapped[dict[str, Any]] = mapped_column(JsonType)
    conversation_id: Mapped[str | None] = mapped_column(
        Id, ForeignKey("conversations.id", ondelete="CASCADE")
    )
    conversation_position: Mapped[int | None] = mapped_column(BigInteger)
    created_at: Mapped[float] = mapped_column(Double)
    # Its response's thread and depth, copied when it is written: a thread's items up to a depth are
    # one range of ix_items_thread, in history order. NULL for items added to a conversation directly.
    thread: Mapped[str | None] = mapped_column(Id)
    depth: Mapped[int | None] = mapped_column(Integer)

    __table_args__ = (
        Index("ix_items_response", "response_id", "segment", "position"),
        Index("ix_items_conversation", "conversation_id", "conversation_position"),
        Index("ix_items_thread", "thread", "depth", "segment", "position"),
    )


INPUT_SEGMENT = 0
OUTPUT_SEGMENT = 1


class ResponseEvent(Base):
    """One stream event of a background response created with `stream: true`, as it was emitted: any
    replica replays them after a sequence number and follows the table until the terminal event."""

    __tablename__ = "response_events"

    response_id: Mapped[str] = mapped_column(
        Id, ForeignKey("responses.id", ondelete="CASCADE"), primary_key=True
    )
    sequence_number: Mapped[int] = mapped_column(Integer, primary_key=True)
    tenant: Mapped[str] = mapped_column(Id)
    type: Mapped[str] = mapped_column(String(64))
    event: Mapped[dict[str, Any]] = mapped_column(JsonType)
    created_at: Mapped[float] = mapped_column(Double)
    # The response's own expiry: the retention worker deletes them then, whatever its lineage does.
    expires_at: Mapped[float] = mapped_column(Double)

    __table_args__ = (Index("ix_response_events_expires_at", "expires_at"),)


class PrefixRecord(Base):
    """The hot-path row: what the backend rendered for one turn, as hashes and counts, and its handle."""

    __tablename__ = "prefix_records"

    response_id: Mapped[str] = mapped_column(
        Id, ForeignKey("responses.id", ondelete="CASCADE"), primary_key=True
    )
    tenant: Mapped[str] = mapped_column(Id)
    model: Mapped[str] = mapped_column(String(256))
    status: Mapped[str] = mapped_column(String(16))  # valid | invalidated
    invalid_reason: Mapped[str | None] = mapped_column(String(128))
    decision_path: Mapped[str] = mapped_column(String(16))
    decision_reason: Mapped[str] = mapped_column(String(64))
    # What the backend generated from, as it reported it.
    prompt_tokens: Mapped[int | None] = mapped_column(Integer)
    prompt_digest: Mapped[str | None] = mapped_column(String(32))
    cached_tokens: Mapped[int | None] = mapped_column(Integer)
    reused_tokens: Mapped[int | None] = mapped_column(Integer)
    bytes_sent: Mapped[int] = mapped_column(Integer)
    # The turn as the next render sees it, and the safe-boundary proof the backend certified.
    turn_tokens: Mapped[int | None] = mapped_column(Integer)
    safe_boundary: Mapped[bool | None] = mapped_column(Boolean)
    safe_tokens: Mapped[int | None] = mapped_column(Integer)
    prefix_hash: Mapped[str | None] = mapped_column(String(32))
    covers_output: Mapped[bool | None] = mapped_column(Boolean)
    fingerprint: Mapped[str | None] = mapped_column(String(32))
    # The backend's own model fingerprint the handle was made under; sent back when it is used.
    backend_fingerprint: Mapped[str | None] = mapped_column(String(32))
    fingerprint_parts: Mapped[dict[str, Any]] = mapped_column(JsonType)
    handle_ref: Mapped[str | None] = mapped_column(String(128))
    handle_endpoint: Mapped[str | None] = mapped_column(String(256))
    handle_epoch: Mapped[str | None] = mapped_column(String(64))
    handle_expires_at: Mapped[float | None] = mapped_column(Double)
    conversation_version: Mapped[int | None] = mapped_column(BigInteger)
    # llm-d's session token from this turn's reply (the replica that holds its KV), sent back with the
    # next turn of the lineage while this record is valid.
    session_token: Mapped[str | None] = mapped_column(String(512))
    created_at: Mapped[float] = mapped_column(Double)

    __table_args__ = (Index("ix_prefix_records_tenant_model", "tenant", "model"),)


class TokenArtifact(Base):
    """The cold path: the exact token ids a turn was generated from and generated, packed (uint32, little
    endian) and compressed, written off the request path by the artifact writer and kept for a shorter
    retention than responses. Read by reseed, the admin diagnostics and the append-safety statistics."""

    __tablename__ = "token_artifacts"

    response_id: Mapped[str] = mapped_column(
        Id, ForeignKey("responses.id", ondelete="CASCADE"), primary_key=True
    )
    tenant: Mapped[str] = mapped_column(Id)
    model: Mapped[str] = mapped_column(String(256))
    # The chat_template fingerprint part: append-safety is a property of the template.
    template: Mapped[str | None] = mapped_column(String(64))
    parent_id: Mapped[str | None] = mapped_column(Id)
    # The combined fingerprint the ids were produced under (the prefix record's).
    fingerprint: Mapped[str | None] = mapped_column(String(32))
    decision: Mapped[str] = mapped_column(String(128))
    prompt_count: Mapped[int] = mapped_column(Integer)
    output_count: Mapped[int] = mapped_column(Integer)
    # 0 when `prompt_ids` is the whole prompt; else it holds the ids from this index on, and the ones
    # before are the parent's artifact's first ones (after a cache reference: only what the turn added).
    prompt_start: Mapped[int] = mapped_column(Integer, server_default="0")
    prompt_ids: Mapped[bytes] = mapped_column(LargeBinary)
    output_ids: Mapped[bytes] = mapped_column(LargeBinary)
    # Observed append-safety: are the parent's prompt + output ids an exact prefix of this prompt? NULL
    # when not comparable (no parent artifact, or another fingerprint). `divergence`: the first index
    # where they differ.
    append_safe: Mapped[bool | None] = mapped_column(Boolean)
    divergence: Mapped[int | None] = mapped_column(Integer)
    # Set when the observation contradicted the parent record's claim of a safe boundary.
    diagnostic: Mapped[dict[str, Any] | None] = mapped_column(NullableJson)
    created_at: Mapped[float] = mapped_column(Double)
    expires_at: Mapped[float] = mapped_column(Double)

    __table_args__ = (
        Index("ix_token_artifacts_expires_at", "expires_at"),
        Index("ix_token_artifacts_model", "model", "template"),
    )


class Invalidation(Base):
    """A scoped invalidation: every record of the scope created before `created_at` is stale. Also the
    change feed every replica follows (salt rotations, key revocations) and the audit log of both."""

    __tablename__ = "invalidations"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    scope: Mapped[str] = mapped_column(String(16))  # service.domain.invalidation.Scope
    key: Mapped[str | None] = mapped_column(String(256))
    # Response scope: the response's lineage root and depth (it and its descendants).
    lineage_root: Mapped[str | None] = mapped_column(Id)
    depth: Mapped[int | None] = mapped_column(Integer)
    reason: Mapped[str] = mapped_column(Text)
    actor: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[float] = mapped_column(Double)

    __table_args__ = (Index("ix_invalidations_scope", "scope", "key", "created_at"),)


class ReplayEntry(Base):
    """One request of the replay cache, by tenant and canonical key: `pending` while the one process
    that holds its lease asks the backend (everyone else waits for it), `ready` with the stored result."""

    __tablename__ = "replay_cache"

    tenant: Mapped[str] = mapped_column(Id, primary_key=True)
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    endpoint: Mapped[str] = mapped_column(String(32))  # chat.completions | completions | responses
    model: Mapped[str] = mapped_column(String(256))
    # The backend's model fingerprint the result was produced under; a new one empties the model's entries.
    fingerprint: Mapped[str | None] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16))  # pending | ready
    owner: Mapped[str | None] = mapped_column(String(64))
    lease_expires_at: Mapped[float | None] = mapped_column(Double)
    # The canonical request (what the key hashes) and the backend's whole reply.
    request: Mapped[dict[str, Any] | None] = mapped_column(JsonType)
    result: Mapped[dict[str, Any] | None] = mapped_column(JsonType)
    bytes: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[float] = mapped_column(Double)
    expires_at: Mapped[float] = mapped_column(Double)

    __table_args__ = (
        Index("ix_replay_cache_model", "model", "fingerprint"),
        Index("ix_replay_cache_created", "created_at"),
    )


class NamedPrefix(Base):
    """A named prefix of a tenant: instructions, tools and initial input items as registered."""

    __tablename__ = "prefixes"

    tenant: Mapped[str] = mapped_column(Id, primary_key=True)
    name: Mapped[str] = mapped_column(Id, primary_key=True)
    model: Mapped[str] = mapped_column(String(256))
    instructions: Mapped[str | None] = mapped_column(Text)
    tools: Mapped[list[Any] | None] = mapped_column(JsonType)
    input: Mapped[list[Any]] = mapped_column(JsonType)
    # What the backend counted when the prefix was warmed up.
    prompt_tokens: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[float] = mapped_column(Double)
