"""Token artifacts whose prompt ids start after their parent's handle: `prompt_start`.

A turn that continued a handle gets back only the prompt ids after the part it shares with the prompt
of the turn that registered the handle, and stores only those: the reply and the artifact stay the same
size at any depth. The ids before `prompt_start` are the parent's artifact's first ones; a whole prompt
is rebuilt by walking the chain (reseed, the admin view).

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("token_artifacts") as batch:
        batch.add_column(sa.Column("prompt_start", sa.Integer(), nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("token_artifacts") as batch:
        batch.drop_column("prompt_start")
