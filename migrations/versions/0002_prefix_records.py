"""Prefix records and scoped invalidations.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
ID = sa.String(64)


def upgrade() -> None:
    op.create_table(
        "prefix_records",
        sa.Column("response_id", ID, sa.ForeignKey("responses.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("tenant", ID, nullable=False),
        sa.Column("model", sa.String(256), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("invalid_reason", sa.String(128)),
        sa.Column("decision_path", sa.String(16), nullable=False),
        sa.Column("decision_reason", sa.String(64), nullable=False),
        sa.Column("prompt_tokens", sa.Integer()),
        sa.Column("prompt_digest", sa.String(32)),
        sa.Column("cached_tokens", sa.Integer()),
        sa.Column("reused_tokens", sa.Integer()),
        sa.Column("bytes_sent", sa.Integer(), nullable=False),
        sa.Column("turn_tokens", sa.Integer()),
        sa.Column("safe_boundary", sa.Boolean()),
        sa.Column("safe_tokens", sa.Integer()),
        sa.Column("prefix_hash", sa.String(32)),
        sa.Column("covers_output", sa.Boolean()),
        sa.Column("fingerprint", sa.String(32)),
        sa.Column("backend_fingerprint", sa.String(32)),
        sa.Column("fingerprint_parts", JSON, nullable=False),
        sa.Column("handle_ref", sa.String(128)),
        sa.Column("handle_endpoint", sa.String(256)),
        sa.Column("handle_epoch", sa.String(64)),
        sa.Column("handle_expires_at", sa.Double()),
        sa.Column("conversation_version", sa.BigInteger()),
        sa.Column("created_at", sa.Double(), nullable=False),
    )
    op.create_index("ix_prefix_records_tenant_model", "prefix_records", ["tenant", "model"])
    op.create_table(
        "invalidations",
        sa.Column(
            "id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=True
        ),
        sa.Column("scope", sa.String(16), nullable=False),
        sa.Column("key", sa.String(256)),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("actor", sa.String(128), nullable=False),
        sa.Column("created_at", sa.Double(), nullable=False),
    )
    op.create_index("ix_invalidations_scope", "invalidations", ["scope", "key", "created_at"])


def downgrade() -> None:
    op.drop_table("invalidations")
    op.drop_table("prefix_records")
