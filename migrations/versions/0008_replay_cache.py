"""The request-level replay cache, and each tenant's opt-in to it.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

ID = sa.String(64)
JSON = sa.JSON().with_variant(JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "replay_cache",
        sa.Column("tenant", ID, primary_key=True),
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("endpoint", sa.String(32), nullable=False),
        sa.Column("model", sa.String(256), nullable=False),
        sa.Column("fingerprint", sa.String(64)),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("owner", sa.String(64)),
        sa.Column("lease_expires_at", sa.Double()),
        sa.Column("request", JSON),
        sa.Column("result", JSON),
        sa.Column("bytes", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.Column("expires_at", sa.Double(), nullable=False),
    )
    op.create_index("ix_replay_cache_model", "replay_cache", ["model", "fingerprint"])
    op.create_index("ix_replay_cache_created", "replay_cache", ["created_at"])
    opted_in: sa.Column[bool] = sa.Column(
        "replay_cache", sa.Boolean(), nullable=False, server_default=sa.false()
    )
    op.add_column("tenants", opted_in)


def downgrade() -> None:
    op.drop_column("tenants", "replay_cache")
    op.drop_table("replay_cache")
