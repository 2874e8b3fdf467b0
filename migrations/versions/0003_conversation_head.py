"""The head response of a conversation: the parent of its next turn.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("conversations", sa.Column("head_response_id", sa.String(64), nullable=True))


def downgrade() -> None:
    # Not a batch operation: on SQLite that copies and drops the table, and dropping `conversations`
    # with foreign keys on cascades to every conversation item. SQLite >= 3.35 drops a column in place.
    op.drop_column("conversations", "head_response_id")
