"""Named prefixes: a long common start of many requests, registered once per tenant (POST /v1/prefixes).

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

ID = sa.String(64)
JSON = sa.JSON().with_variant(JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "prefixes",
        sa.Column("tenant", ID, primary_key=True),
        sa.Column("name", ID, primary_key=True),
        sa.Column("model", sa.String(256), nullable=False),
        sa.Column("instructions", sa.Text()),
        sa.Column("tools", JSON),
        sa.Column("input", JSON, nullable=False),
        sa.Column("prompt_tokens", sa.Integer()),
        sa.Column("created_at", sa.Double(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("prefixes")
