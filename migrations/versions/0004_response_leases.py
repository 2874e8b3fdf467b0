"""Leases on queued and running responses, so a reaper can tell a crashed worker from a slow one.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("responses") as batch:
        batch.add_column(sa.Column("lease_expires_at", sa.Double()))


def downgrade() -> None:
    with op.batch_alter_table("responses") as batch:
        batch.drop_column("lease_expires_at")
