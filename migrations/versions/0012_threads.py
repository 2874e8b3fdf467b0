"""Threads: a response's `thread` (unique with its depth), and its items' copy of thread and depth.

The history of a chain is read a thread at a time, each one range of `ix_items_thread`, instead of one
index lookup per ancestor (service/domain/threads.py). Existing responses each become a thread of their
own, and their items get their response's thread and depth: their histories read as before, one range
per response, and new turns continue their threads.

During a rolling update the previous version still writes rows without a thread. On Postgres, triggers
give such a response a thread of its own and such an item its response's thread and depth, so every
row is readable by thread; they fire only for rows written without one (a later release may drop them).

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

ID = sa.String(64)

# An existing response's thread is its own id, so its items' thread is their response id.
_BACKFILL_ITEMS = """
UPDATE items SET thread = response_id,
                 depth = (SELECT responses.depth FROM responses WHERE responses.id = items.response_id)
WHERE response_id IS NOT NULL
"""


# The previous version's writes during a rolling update (Postgres): a response without a thread is a
# thread of its own; an item without one gets its response's thread and depth. Only those rows fire them.
_PREVIOUS_WRITERS = (
    """CREATE FUNCTION convstate_response_thread() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        NEW.thread := NEW.id;
        RETURN NEW;
    END $$""",
    """CREATE TRIGGER responses_without_thread BEFORE INSERT ON responses
        FOR EACH ROW WHEN (NEW.thread IS NULL) EXECUTE FUNCTION convstate_response_thread()""",
    """CREATE FUNCTION convstate_item_thread() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        SELECT r.thread, r.depth INTO NEW.thread, NEW.depth FROM responses r WHERE r.id = NEW.response_id;
        RETURN NEW;
    END $$""",
    """CREATE TRIGGER items_without_thread BEFORE INSERT ON items
        FOR EACH ROW WHEN (NEW.thread IS NULL AND NEW.response_id IS NOT NULL)
        EXECUTE FUNCTION convstate_item_thread()""",
)


# Plain ADD/DROP COLUMN, not batch mode: SQLite (3.35+) does both in place, while a batch table copy
# would drop `responses` and cascade into its items. So the column is NOT NULL on Postgres only.


def upgrade() -> None:
    op.add_column("responses", sa.Column("thread", ID))
    op.execute("UPDATE responses SET thread = id")
    op.create_index("ux_responses_thread", "responses", ["thread", "depth"], unique=True)
    op.add_column("items", sa.Column("thread", ID))
    op.add_column("items", sa.Column("depth", sa.Integer()))
    op.execute(_BACKFILL_ITEMS)
    op.create_index("ix_items_thread", "items", ["thread", "depth", "segment", "position"])
    if op.get_bind().dialect.name == "postgresql":
        op.alter_column("responses", "thread", nullable=False)
        for statement in _PREVIOUS_WRITERS:
            op.execute(statement)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER items_without_thread ON items")
        op.execute("DROP FUNCTION convstate_item_thread()")
        op.execute("DROP TRIGGER responses_without_thread ON responses")
        op.execute("DROP FUNCTION convstate_response_thread()")
    op.drop_index("ix_items_thread", table_name="items")
    op.drop_column("items", "depth")
    op.drop_column("items", "thread")
    op.drop_index("ux_responses_thread", table_name="responses")
    op.drop_column("responses", "thread")
