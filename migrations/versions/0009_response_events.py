"""The stream events of background responses, so any replica can replay and follow them.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

ID = sa.String(64)


def upgrade() -> None:
    op.create_table(
        "response_events",
        sa.Column("response_id", ID, sa.ForeignKey("responses.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("sequence_number", sa.Integer(), primary_key=True),
        sa.Column("tenant", ID, nullable=False),
        sa.Column("type", sa.String(64), nullable=False),
        sa.Column("event", sa.JSON().with_variant(postgresql.JSONB(), "postgresql"), nullable=False),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.Column("expires_at", sa.Double(), nullable=False),
    )
    op.create_index("ix_response_events_expires_at", "response_events", ["expires_at"])


def downgrade() -> None:
    op.drop_index("ix_response_events_expires_at", table_name="response_events")
    op.drop_table("response_events")
