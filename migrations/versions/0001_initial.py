"""Tenants, conversations, responses and items.

Revision ID: 0001
Revises:
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
ID = sa.String(64)


def upgrade() -> None:
    op.create_table(
        "tenants",
        sa.Column("id", ID, primary_key=True),
        sa.Column("cache_salt", sa.String(64), nullable=False),
        sa.Column("created_at", sa.Double(), nullable=False),
    )
    op.create_table(
        "conversations",
        sa.Column("id", ID, primary_key=True),
        sa.Column("tenant", ID, nullable=False),
        sa.Column("metadata", JSON, nullable=False),
        sa.Column("next_position", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("version", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("active_response_id", ID),
        sa.Column("lock_expires_at", sa.Double()),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.Column("deleted_at", sa.Double()),
    )
    op.create_index("ix_conversations_tenant", "conversations", ["tenant"])
    op.create_table(
        "responses",
        sa.Column("id", ID, primary_key=True),
        sa.Column("tenant", ID, nullable=False),
        sa.Column("model", sa.String(256), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("previous_response_id", ID, sa.ForeignKey("responses.id")),
        sa.Column("conversation_id", ID, sa.ForeignKey("conversations.id")),
        sa.Column("depth", sa.Integer(), nullable=False),
        sa.Column("instructions", sa.Text()),
        sa.Column("settings", JSON, nullable=False),
        sa.Column("usage", JSON),
        sa.Column("error", JSON),
        sa.Column("incomplete_details", JSON),
        sa.Column("store", sa.Boolean(), nullable=False),
        sa.Column("background", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.Column("cancel_requested", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.Column("completed_at", sa.Double()),
        sa.Column("expires_at", sa.Double(), nullable=False),
        sa.Column("deleted_at", sa.Double()),
    )
    op.create_index("ix_responses_previous", "responses", ["previous_response_id"])
    op.create_index("ix_responses_expires_at", "responses", ["expires_at"])
    op.create_index(
        "ix_responses_status_active",
        "responses",
        ["status"],
        postgresql_where=sa.text("status IN ('queued', 'in_progress')"),
    )
    op.create_table(
        "items",
        sa.Column("id", ID, primary_key=True),
        sa.Column("tenant", ID, nullable=False),
        sa.Column("response_id", ID, sa.ForeignKey("responses.id", ondelete="CASCADE")),
        sa.Column("segment", sa.SmallInteger(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("type", sa.String(32), nullable=False),
        sa.Column("payload", JSON, nullable=False),
        sa.Column("conversation_id", ID, sa.ForeignKey("conversations.id", ondelete="CASCADE")),
        sa.Column("conversation_position", sa.BigInteger()),
        sa.Column("created_at", sa.Double(), nullable=False),
    )
    op.create_index("ix_items_response", "items", ["response_id", "segment", "position"])
    op.create_index("ix_items_conversation", "items", ["conversation_id", "conversation_position"])


def downgrade() -> None:
    op.drop_table("items")
    op.drop_table("responses")
    op.drop_table("conversations")
    op.drop_table("tenants")
