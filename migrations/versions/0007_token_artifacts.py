"""Token artifacts (the cold path) and llm-d session tokens on prefix records.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
ID = sa.String(64)


def upgrade() -> None:
    op.create_table(
        "token_artifacts",
        sa.Column("response_id", ID, sa.ForeignKey("responses.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("tenant", ID, nullable=False),
        sa.Column("model", sa.String(256), nullable=False),
        sa.Column("template", sa.String(64)),
        sa.Column("parent_id", ID),
        sa.Column("fingerprint", sa.String(32)),
        sa.Column("decision", sa.String(128), nullable=False),
        sa.Column("prompt_count", sa.Integer(), nullable=False),
        sa.Column("output_count", sa.Integer(), nullable=False),
        sa.Column("prompt_ids", sa.LargeBinary(), nullable=False),
        sa.Column("output_ids", sa.LargeBinary(), nullable=False),
        sa.Column("append_safe", sa.Boolean()),
        sa.Column("divergence", sa.Integer()),
        sa.Column("diagnostic", JSON),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.Column("expires_at", sa.Double(), nullable=False),
    )
    op.create_index("ix_token_artifacts_expires_at", "token_artifacts", ["expires_at"])
    op.create_index("ix_token_artifacts_model", "token_artifacts", ["model", "template"])
    op.add_column("prefix_records", sa.Column("session_token", sa.String(512)))


def downgrade() -> None:
    op.drop_column("prefix_records", "session_token")
    op.drop_table("token_artifacts")
