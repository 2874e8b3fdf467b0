"""Where a conversation turn starts in its conversation, so its input items can list the history it used.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

# A turn already in a conversation starts at its first appended item; one that was never appended
# (failed, cancelled) cannot be placed and keeps NULL: its input items are then only its own input.
_BACKFILL = """
UPDATE responses SET conversation_start = (
    SELECT min(items.conversation_position) FROM items
    WHERE items.response_id = responses.id AND items.conversation_id = responses.conversation_id
)
WHERE conversation_id IS NOT NULL
"""


# Plain ADD/DROP COLUMN, not batch mode: SQLite (3.35+) does both in place, while a batch table copy
# would drop `responses` and cascade into its items.


def upgrade() -> None:
    op.add_column("responses", sa.Column("conversation_start", sa.BigInteger()))
    op.execute(_BACKFILL)


def downgrade() -> None:
    op.drop_column("responses", "conversation_start")
