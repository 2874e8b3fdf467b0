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


# Plain ADD/DROP COLUMN, not batch mode: SQLite (3.35+) does both in place, while a batch table copy
# would drop `responses` and cascade into its items.


def upgrade() -> None:
    op.add_column("responses", sa.Column("lease_expires_at", sa.Double()))


def downgrade() -> None:
    op.drop_column("responses", "lease_expires_at")
