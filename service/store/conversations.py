"""Conversations, their item sequence and the per-conversation turn lock: every SQL statement lives here.

Round trips are fixed whatever the length of a conversation: an edit of the item list is one conditional
UPDATE of the conversation row (allocating positions and bumping `version`) plus one statement on the
items; reads are one query (plus one existence check only when a page comes back empty or a lookup
fails). A conversation is "unknown" when it does not exist, belongs to another tenant or was deleted:
every method answers None (or an empty history) for it; an unknown item in a known conversation raises
NotFound, so the API can tell the two apart.

The turn lock is a lease: the running turn renews it every heartbeat, and once it lapses (its process
died) the next turn takes it over and item edits go through. While it is held, edits of the item list are
refused (`conversation_locked`) so nothing lands before the running turn's input.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, Select, and_, case, delete, insert, literal_column, or_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from service.domain import ids
from service.errors import InvalidRequest, NotFound
from service.observe import db_call
from service.store.db import autocommit
from service.store.models import INPUT_SEGMENT, OUTPUT_SEGMENT, Conversation, Item
from service.store.unit import UnitOfWork

ItemPayload = dict[str, Any]


@dataclass(slots=True)
class StoredConversation:
    id: str
    tenant: str
    metadata: dict[str, Any]
    created_at: float
    version: int
    head_response_id: str | None


@dataclass(slots=True)
class ConversationTurn:
    """What a turn needs from its conversation, read while taking the turn lock."""

    version: int
    head_response_id: str | None
    next_position: int


_CONVERSATION_COLUMNS = (
    Conversation.id,
    Conversation.tenant,
    Conversation.metadata_,
    Conversation.created_at,
    Conversation.version,
    Conversation.head_response_id,
)


def _live(tenant: str, conversation_id: str) -> ColumnElement[bool]:
    return and_(
        Conversation.id == conversation_id,
        Conversation.tenant == tenant,
        Conversation.deleted_at.is_(None),
    )


def _exists(tenant: str, conversation_id: str) -> Select[Any]:
    return select(literal_column("1")).where(_live(tenant, conversation_id))


def _held_by(tenant: str, conversation_id: str, response_id: str) -> ColumnElement[bool]:
    return and_(
        Conversation.id == conversation_id,
        Conversation.tenant == tenant,
        Conversation.active_response_id == response_id,
    )


def _unlocked(now: float) -> ColumnElement[bool]:
    return or_(Conversation.active_response_id.is_(None), Conversation.lock_expires_at < now)


def conversation_locked(conversation_id: str) -> InvalidRequest:
    # OpenAI's status, type, param and code for the same refusal.
    return InvalidRequest(
        f"Another response is in progress for conversation {conversation_id}. Please retry in a few seconds.",
        param="conversation",
        code="conversation_locked",
    )


async def _known(conn: AsyncConnection, tenant: str, conversation_id: str, now: float) -> bool:
    """After a conditional UPDATE matched nothing: False if the conversation is unknown, True if it is
    known and free; raises conversation_locked if a turn holds it."""
    query = select(Conversation.lock_expires_at).where(
        _live(tenant, conversation_id), Conversation.active_response_id.is_not(None)
    )
    locked = (await conn.execute(query)).first()
    if locked is not None and locked[0] is not None and locked[0] >= now:
        raise conversation_locked(conversation_id)
    return locked is not None or (await conn.execute(_exists(tenant, conversation_id))).first() is not None


def item_not_found(conversation_id: str, item_id: str) -> NotFound:
    return NotFound(
        f"No item found with id '{item_id}' in conversation '{conversation_id}'.", param="item_id"
    )


def _item_row(
    tenant: str, conversation_id: str, conversation_position: int, item: ItemPayload, now: float
) -> dict[str, Any]:
    return {
        "id": item["id"],
        "tenant": tenant,
        "response_id": None,
        "segment": INPUT_SEGMENT,
        "position": 0,
        "type": item["type"],
        "payload": item,
        "conversation_id": conversation_id,
        "conversation_position": conversation_position,
        "created_at": now,
    }


class ConversationStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self._reads = autocommit(engine)

    @db_call
    async def create(
        self, tenant: str, *, metadata: dict[str, Any], items: Sequence[ItemPayload], now: float
    ) -> StoredConversation:
        """A new conversation with its initial items (positions 0..n-1): one transaction, two inserts."""
        conversation = StoredConversation(
            id=ids.new_id(ids.CONVERSATION),
            tenant=tenant,
            metadata=metadata,
            created_at=now,
            version=0,
            head_response_id=None,
        )
        values = {
            Conversation.id: conversation.id,
            Conversation.tenant: tenant,
            Conversation.metadata_: metadata,
            Conversation.next_position: len(items),
            Conversation.version: 0,
            Conversation.created_at: now,
        }
        rows = [
            _item_row(tenant, conversation.id, position, item, now) for position, item in enumerate(items)
        ]
        async with self.engine.begin() as conn:
            await conn.execute(insert(Conversation).values(values))
            if rows:
                await conn.execute(insert(Item), rows)
        return conversation

    @db_call
    async def get(self, tenant: str, conversation_id: str) -> StoredConversation | None:
        """The conversation, or None if unknown: one query."""
        query = select(*_CONVERSATION_COLUMNS).where(_live(tenant, conversation_id))
        async with self._reads.connect() as conn:
            row = (await conn.execute(query)).first()
        return None if row is None else StoredConversation(*row)

    @db_call
    async def update_metadata(
        self, tenant: str, conversation_id: str, metadata: dict[str, Any]
    ) -> StoredConversation | None:
        """Replace the metadata; the updated conversation, or None if unknown: one statement."""
        statement = (
            update(Conversation)
            .where(_live(tenant, conversation_id))
            .values({Conversation.metadata_: metadata})
            .returning(*_CONVERSATION_COLUMNS)
        )
        async with self.engine.begin() as conn:
            row = (await conn.execute(statement)).first()
        return None if row is None else StoredConversation(*row)

    @db_call
    async def delete(self, tenant: str, conversation_id: str, now: float) -> bool:
        """Soft-delete (the items stay, for the responses that own them); False if unknown."""
        statement = update(Conversation).where(_live(tenant, conversation_id)).values(deleted_at=now)
        async with self.engine.begin() as conn:
            result = await conn.execute(statement)
        return bool(result.rowcount)

    @db_call
    async def add_items(
        self, tenant: str, conversation_id: str, items: Sequence[ItemPayload], now: float
    ) -> bool:
        """Append items (an edit: bumps version); False if the conversation is unknown, conversation_locked
        while a turn runs. Two statements."""
        count = len(items)
        allocate = (
            update(Conversation)
            .where(_live(tenant, conversation_id), _unlocked(now))
            .values(next_position=Conversation.next_position + count, version=Conversation.version + 1)
            .returning(Conversation.next_position)
        )
        async with self.engine.begin() as conn:
            end = (await conn.execute(allocate)).scalar_one_or_none()
            if end is None:
                await _known(conn, tenant, conversation_id, now)
                return False
            start = end - count
            rows = [
                _item_row(tenant, conversation_id, start + offset, item, now)
                for offset, item in enumerate(items)
            ]
            if rows:
                await conn.execute(insert(Item), rows)
        return True

    @db_call
    async def list_items(
        self, tenant: str, conversation_id: str, *, after: str | None, limit: int, descending: bool
    ) -> tuple[bool, list[ItemPayload]] | None:
        """(has_more, page) of the conversation's items in position order, or None if unknown."""
        exists = _exists(tenant, conversation_id)
        order = Item.conversation_position.desc() if descending else Item.conversation_position.asc()
        query = select(Item.payload).where(
            Item.conversation_id == conversation_id, Item.tenant == tenant, exists.exists()
        )
        if after is not None:
            cursor = (
                select(Item.conversation_position)
                .where(Item.id == after, Item.conversation_id == conversation_id)
                .scalar_subquery()
            )
            query = query.where(
                Item.conversation_position < cursor if descending else Item.conversation_position > cursor
            )
        async with self._reads.connect() as conn:
            rows = (await conn.execute(query.order_by(order).limit(limit + 1))).all()
            if not rows and not (await conn.execute(exists)).first():
                return None
        return len(rows) > limit, [row.payload for row in rows[:limit]]

    @db_call
    async def get_item(self, tenant: str, conversation_id: str, item_id: str) -> ItemPayload | None:
        """One item of the conversation; None if the conversation is unknown, NotFound if the item is."""
        query = select(Item.payload).where(
            Item.id == item_id,
            Item.conversation_id == conversation_id,
            Item.tenant == tenant,
            _exists(tenant, conversation_id).exists(),
        )
        async with self._reads.connect() as conn:
            payload = (await conn.execute(query)).scalar_one_or_none()
            if payload is None:
                if (await conn.execute(_exists(tenant, conversation_id))).first() is None:
                    return None
                raise item_not_found(conversation_id, item_id)
        item: ItemPayload = payload
        return item

    @db_call
    async def delete_item(
        self, tenant: str, conversation_id: str, item_id: str, now: float
    ) -> StoredConversation | None:
        """Remove an item (an edit: bumps version); the conversation, None if unknown, NotFound if the item
        is, conversation_locked while a turn runs. An item a response produced or carried is only
        detached: the response's history keeps it."""
        in_conversation = and_(Item.id == item_id, Item.conversation_id == conversation_id)
        owner = select(Item.response_id).where(in_conversation).scalar_subquery()
        bump = (
            update(Conversation)
            .where(
                _live(tenant, conversation_id),
                _unlocked(now),
                select(Item.id).where(in_conversation).exists(),
            )
            .values(version=Conversation.version + 1)
            .returning(*_CONVERSATION_COLUMNS, owner)
        )
        async with self.engine.begin() as conn:
            row = (await conn.execute(bump)).first()
            if row is None:
                if not await _known(conn, tenant, conversation_id, now):
                    return None
                raise item_not_found(conversation_id, item_id)
            if row[-1] is None:
                result = await conn.execute(delete(Item).where(in_conversation))
            else:
                result = await conn.execute(
                    update(Item)
                    .where(in_conversation)
                    .values(conversation_id=None, conversation_position=None)
                )
            if not result.rowcount:
                # A concurrent delete won the race: roll the version bump back with the transaction.
                raise item_not_found(conversation_id, item_id)
        return StoredConversation(*row[:-1])

    @db_call
    async def history(self, tenant: str, conversation_id: str) -> list[tuple[bool, list[ItemPayload]]]:
        """Every item in position order as (is a response's output, items) segments, like
        ResponseStore.history (a run of directly added items is one input segment); empty if unknown."""
        query = (
            select(Item.response_id, Item.segment, Item.payload)
            .where(
                Item.conversation_id == conversation_id,
                Item.tenant == tenant,
                _exists(tenant, conversation_id).exists(),
            )
            .order_by(Item.conversation_position)
        )
        async with self._reads.connect() as conn:
            rows = (await conn.execute(query)).all()
        segments: list[tuple[bool, list[ItemPayload]]] = []
        current: tuple[str | None, int] | None = None
        for response_ref, segment, payload in rows:
            if (response_ref, segment) != current:
                current = (response_ref, segment)
                segments.append((response_ref is not None and segment == OUTPUT_SEGMENT, []))
            segments[-1][1].append(payload)
        return segments

    # --- the turn lock ------------------------------------------------------------------------------

    @db_call
    async def begin_turn(
        self, tenant: str, conversation_id: str, response_id: str, lease_seconds: float, now: float
    ) -> ConversationTurn | None:
        """Take the turn lock, or take over one whose lease lapsed (one conditional UPDATE); None if
        unknown, conversation_locked if a live turn holds it."""
        statement = (
            update(Conversation)
            .where(_live(tenant, conversation_id), _unlocked(now))
            .values(active_response_id=response_id, lock_expires_at=now + lease_seconds)
            .returning(Conversation.version, Conversation.head_response_id, Conversation.next_position)
        )
        async with self.engine.begin() as conn:
            row = (await conn.execute(statement)).first()
            if row is None:
                await _known(conn, tenant, conversation_id, now)
                return None
        return ConversationTurn(*row)

    @db_call
    async def refuse_turn(self, tenant: str, conversation_id: str, now: float) -> None:
        """Why a turn could not take the lock: conversation_locked if a live turn holds it; returns if the
        conversation is unknown (or was freed meanwhile)."""
        async with self._reads.connect() as conn:
            await _known(conn, tenant, conversation_id, now)

    @db_call
    async def renew_turn(
        self, tenant: str, conversation_id: str, response_id: str, lock_expires_at: float
    ) -> bool:
        """The running turn's heartbeat: extend its lock; False if it lost the lock (the lease lapsed and
        another turn took it over)."""
        statement = (
            update(Conversation)
            .where(_held_by(tenant, conversation_id, response_id))
            .values(lock_expires_at=lock_expires_at)
        )
        async with self.engine.begin() as conn:
            result = await conn.execute(statement)
        return bool(result.rowcount)

    async def finish_turn(
        self,
        uow: UnitOfWork,
        tenant: str,
        conversation_id: str,
        response_id: str,
        item_ids: Sequence[str],
    ) -> int:
        """In the caller's unit of work: append the turn's already inserted items (input then output,
        in order), make the response the head and release the lock, without bumping version. Two
        statements; returns the conversation's version. Raises conversation_locked if the lease lapsed and
        another response took the lock, so the caller's unit rolls back."""
        count = len(item_ids)
        advance = (
            update(Conversation)
            .where(_held_by(tenant, conversation_id, response_id))
            .values(
                next_position=Conversation.next_position + count,
                head_response_id=response_id,
                active_response_id=None,
                lock_expires_at=None,
            )
            .returning(Conversation.next_position, Conversation.version)
        )
        row = (await uow.conn.execute(advance)).first()
        if row is None:
            raise conversation_locked(conversation_id)
        end, version = row
        if count:
            start = end - count
            positions = {item_id: start + offset for offset, item_id in enumerate(item_ids)}
            result = await uow.conn.execute(
                update(Item)
                .where(Item.id.in_(item_ids), Item.tenant == tenant)
                .values(conversation_id=conversation_id, conversation_position=case(positions, value=Item.id))
            )
            if result.rowcount != count:
                raise RuntimeError(
                    f"finish_turn: {count - result.rowcount} of the turn's items are not stored"
                )
        return int(version)

    async def release_turn(
        self, uow: UnitOfWork, tenant: str, conversation_id: str, response_id: str
    ) -> bool:
        """In the caller's unit: release the turn lock if `response_id` still holds it (a turn that ends
        without joining the conversation); False otherwise."""
        statement = (
            update(Conversation)
            .where(_held_by(tenant, conversation_id, response_id))
            .values(active_response_id=None, lock_expires_at=None)
        )
        result = await uow.conn.execute(statement)
        return bool(result.rowcount)

    async def release_reaped(
        self, uow: UnitOfWork, conversation_ids: Sequence[str], response_ids: Sequence[str]
    ) -> int:
        """In the reaper's unit: free the conversations still locked by responses it just failed."""
        if not conversation_ids:
            return 0
        statement = (
            update(Conversation)
            .where(Conversation.id.in_(conversation_ids), Conversation.active_response_id.in_(response_ids))
            .values(active_response_id=None, lock_expires_at=None)
        )
        result = await uow.conn.execute(statement)
        return int(result.rowcount or 0)
