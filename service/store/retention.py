"""Deleting expired responses, in bounded batches.

A response expires on its own `expires_at` (reads hide it at once), but its rows go only when every
response of its lineage has expired: a live descendant still renders its ancestors' items. A batch takes
the deepest rows of fully expired lineages first, so a child always goes with or before its parent, and
deletes them with their items and prefix records (foreign-key cascades) in one short transaction.
Conversation items do not expire: they are detached from the response and stay in the conversation, whose
version is bumped (its history is segmented differently now, so no handle built before is reused).
"""

from __future__ import annotations

from sqlalchemy import and_, delete, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from service.observe import db_call
from service.store.models import Conversation, Item, Response


class RetentionStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    @db_call
    async def purge(self, now: float, batch: int) -> int:
        """Delete up to `batch` expired responses; how many went."""
        live = Response.__table__.alias("live")
        fully_expired = ~(
            select(live.c.id)
            .where(live.c.lineage_root == Response.lineage_root, live.c.expires_at >= now)
            .exists()
        )
        doomed = (
            select(Response.id, Response.conversation_id)
            .where(Response.expires_at < now, fully_expired)
            .order_by(Response.depth.desc())
            .limit(batch)
        )
        async with self.engine.begin() as conn:
            rows = (await conn.execute(doomed)).all()
            if not rows:
                return 0
            ids = [row.id for row in rows]
            conversations = {row.conversation_id for row in rows if row.conversation_id is not None}
            if conversations:
                await conn.execute(
                    update(Item)
                    .where(Item.response_id.in_(ids), Item.conversation_id.is_not(None))
                    .values(response_id=None)
                )
                await conn.execute(
                    update(Conversation)
                    .where(Conversation.id.in_(conversations))
                    .values(version=Conversation.version + 1)
                )
                await conn.execute(
                    update(Conversation)
                    .where(and_(Conversation.id.in_(conversations), Conversation.head_response_id.in_(ids)))
                    .values(head_response_id=None)
                )
            await conn.execute(delete(Response).where(Response.id.in_(ids)))
        return len(ids)
