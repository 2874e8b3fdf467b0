"""Tenancy: API keys, per-tenant retention, lineage roots for scoped invalidation.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

ID = sa.String(64)

# Every response carries the id of its lineage's first response, so "this response and its descendants"
# is one (root, depth >= d) rule instead of a walk over the tree. Conversation turns chain through the
# conversation's head, not previous_response_id, so an existing conversation's turns share one root: the
# conversation id.
_BACKFILL_ROOTS = """
WITH RECURSIVE lineage(id, root) AS (
    SELECT id, COALESCE(conversation_id, id) FROM responses WHERE previous_response_id IS NULL
    UNION ALL
    SELECT child.id, lineage.root FROM responses child JOIN lineage ON child.previous_response_id = lineage.id
)
UPDATE responses SET lineage_root = (SELECT root FROM lineage WHERE lineage.id = responses.id)
"""


# Plain ADD/DROP COLUMN, not batch mode: SQLite (3.35+) does both in place, while a batch table copy
# would drop `responses` and cascade into its items.


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("id", ID, primary_key=True),
        sa.Column("key_hash", sa.String(64), nullable=False),
        sa.Column("tenant", ID, sa.ForeignKey("tenants.id"), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("name", sa.String(128), nullable=False, server_default=""),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.Column("revoked_at", sa.Double()),
    )
    op.create_index("ux_api_keys_hash", "api_keys", ["key_hash"], unique=True)
    op.create_index("ix_api_keys_tenant", "api_keys", ["tenant"])
    op.add_column("tenants", sa.Column("response_ttl_days", sa.Double()))
    op.add_column("responses", sa.Column("lineage_root", ID))
    op.execute(_BACKFILL_ROOTS)
    op.create_index("ix_responses_lineage", "responses", ["lineage_root", "expires_at"])
    op.add_column("invalidations", sa.Column("lineage_root", ID))
    op.add_column("invalidations", sa.Column("depth", sa.Integer()))


def downgrade() -> None:
    op.drop_column("invalidations", "depth")
    op.drop_column("invalidations", "lineage_root")
    op.drop_index("ix_responses_lineage", table_name="responses")
    op.drop_column("responses", "lineage_root")
    op.drop_column("tenants", "response_ttl_days")
    op.drop_table("api_keys")
