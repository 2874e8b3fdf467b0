"""A turn's own read and write: the round trips every turn pays, kept to the physical minimum.

Whatever its depth, and in a conversation or not, a turn costs the database two round trips:

- **read**: the parent response with its prefix record and output items, one statement. In a conversation
  the same statement first takes the turn lock (a data-modifying CTE) and reads the conversation's head,
  which is the parent, its version and where its next items go.
- **write**: one statement whose data-modifying CTEs insert the response (or move the open one on), its
  items and its prefix record and, in a conversation, place the items at their positions, make the
  response the head and free the lock. One statement is atomic on Postgres, so it needs no BEGIN and no
  COMMIT. Every insert hangs off the response's CTE, and in a conversation the response hangs off the
  conversation row locked by its turn, so a lost lock or a row finished elsewhere writes nothing.

A chain turn's row continues its parent's thread (service/domain/threads.py) unless the read saw another
child there already; a child that loses a race for the thread since is refused by the unique index on
(thread, depth), with nothing written, and written once more as a thread of its own (`_in_thread`).

Rows travel as one JSON document per table, read by `jsonb_populate_record` into the table's own row
type, so the statements are written once from the tables and a new column needs no SQL here (a column
missing from the document is NULL, not its server default). The
statements run on the pool's asyncpg connection directly (store/db.py `fetch`).

SQLite (the embedded default) has no data-modifying CTEs: there the same steps run as separate
statements in one transaction, through ResponseStore and ConversationStore.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import asyncpg
import orjson
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from service.errors import LeaseLost
from service.observe import db_call
from service.store.conversations import ConversationStore, ConversationTurn, conversation_locked
from service.store.db import fetch
from service.store.models import INPUT_SEGMENT, OUTPUT_SEGMENT, THREAD_INDEX
from service.store.responses import (
    PREFIX_COLUMNS,
    RESPONSE_COLUMNS,
    ParentTurn,
    ResponseStore,
    StoredPrefix,
    StoredResponse,
    TurnWrite,
    item_row,
    prefix_row,
    response_row,
)
from service.store.unit import unit_of_work


@dataclass(frozen=True, slots=True)
class ConversationAppend:
    """What a finishing turn does to its conversation: join it (its items from `next_position` on, the
    position read when the lock was taken; nobody else moves it while the lock is held) and become its
    head, or, for a failed turn, only give the lock back."""

    id: str
    next_position: int
    joins: bool


@dataclass(frozen=True, slots=True)
class _Statement:
    """SQL written with :name parameters, numbered for asyncpg in order of first use."""

    sql: str
    names: tuple[str, ...]

    @classmethod
    def of(cls, sql: str) -> _Statement:
        names: list[str] = []

        def number(match: re.Match[str]) -> str:
            if match.group(1) not in names:
                names.append(match.group(1))
            return f"${names.index(match.group(1)) + 1}"

        return cls(re.sub(r"(?<!:):([a-z_]+)", number, sql), tuple(names))

    def args(self, values: Mapping[str, Any]) -> list[Any]:
        return [values[name] for name in self.names]


def _parent_query(response_id: str, *, chain: bool) -> str:
    """The live stored response `response_id` (an SQL expression), its prefix record, whether another
    child already continues its thread (in a `chain`; a conversation turn never continues one) and its
    output items (one JSON array): one row, or none."""
    columns = ", ".join(
        [f"r.{column.name}" for column in RESPONSE_COLUMNS]
        + [f"p.{column.name}" for column in PREFIX_COLUMNS]
    )
    # One probe of the unique index on (thread, depth): the turn chooses its thread before its write.
    taken = (
        "EXISTS (SELECT 1 FROM responses n WHERE n.thread = r.thread AND n.depth = r.depth + 1)"
        if chain
        else "false"
    )
    return f"""
        SELECT {columns}, {taken} AS thread_taken,
               (SELECT jsonb_agg(i.payload ORDER BY i.position) FROM items i
                 WHERE i.response_id = r.id AND i.segment = {OUTPUT_SEGMENT}) AS output
          FROM responses r LEFT JOIN prefix_records p ON p.response_id = r.id
         WHERE r.id = {response_id} AND r.tenant = :tenant AND r.deleted_at IS NULL
           AND r.expires_at > :now AND r.store"""


_PARENT = _Statement.of(_parent_query(":response_id", chain=True))

# Take the turn lock (free, or its lease lapsed) and read the head with it.
_BEGIN = _Statement.of(f"""
    WITH turn AS (
        UPDATE conversations SET active_response_id = :response_id, lock_expires_at = :lock_expires_at
         WHERE id = :conversation_id AND tenant = :tenant AND deleted_at IS NULL
           AND (active_response_id IS NULL OR lock_expires_at < :now)
        RETURNING version, head_response_id, next_position)
    SELECT turn.version, turn.head_response_id, turn.next_position, parent.*
      FROM turn LEFT JOIN LATERAL ({_parent_query("turn.head_response_id", chain=False)}) parent ON true""")

_N_RESPONSE = len(RESPONSE_COLUMNS)
_N_PREFIX = len(PREFIX_COLUMNS)


def _write_statement(*, opened: bool, conversation: str | None) -> _Statement:
    """The write of a finished turn (`opened`: its row exists, in progress, and moves on; else it is
    inserted) with `conversation` None, "joins" or "releases". Answers (written, held): whether the
    response was written and, when joining, whether the turn still held its conversation."""
    ctes = []
    gate = ""
    if conversation == "joins":
        ctes.append("""held AS (
            SELECT 1 FROM conversations
             WHERE id = :conversation_id AND tenant = :tenant AND active_response_id = :response_id
               AND next_position = :next_position::bigint
               FOR NO KEY UPDATE)""")
        gate = "held, "
    if opened:
        ctes.append(f"""resp AS (
            UPDATE responses SET status = r.status, usage = r.usage, error = r.error,
                   incomplete_details = r.incomplete_details, completed_at = r.completed_at,
                   lease_expires_at = NULL
              FROM {gate}jsonb_populate_record(NULL::responses, :response::jsonb) r
             WHERE responses.id = r.id AND responses.status = 'in_progress'
            RETURNING responses.id)""")
    else:
        ctes.append(f"""resp AS (
            INSERT INTO responses
            SELECT r.* FROM {gate}jsonb_populate_record(NULL::responses, :response::jsonb) r
            RETURNING id)""")
    ctes.append("""new_items AS (
            INSERT INTO items
            SELECT i.* FROM resp, jsonb_populate_recordset(NULL::items, :items::jsonb) i)""")
    ctes.append("""prefix AS (
            INSERT INTO prefix_records
            SELECT p.* FROM resp, jsonb_populate_record(NULL::prefix_records, :prefix::jsonb) p
             WHERE :prefix::jsonb IS NOT NULL)""")
    if conversation == "joins" and opened:
        # The input was stored when the turn opened; it joins the conversation now, ahead of the output.
        ctes.append(f"""joined AS (
            UPDATE items
               SET conversation_id = :conversation_id,
                   conversation_position = :next_position::bigint + position
              FROM resp WHERE items.response_id = resp.id AND items.segment = {INPUT_SEGMENT})""")
    if conversation is not None:
        head = (
            "next_position = next_position + :item_count::bigint, head_response_id = :response_id, "
            if conversation == "joins"
            else ""
        )
        ctes.append(f"""moved AS (
            UPDATE conversations SET {head}active_response_id = NULL, lock_expires_at = NULL
              FROM resp
             WHERE conversations.id = :conversation_id AND conversations.tenant = :tenant
               AND conversations.active_response_id = :response_id)""")
    held = "(SELECT count(*) FROM held)" if conversation == "joins" else "1"
    return _Statement.of(f"WITH {', '.join(ctes)} SELECT (SELECT count(*) FROM resp), {held}")


_WRITES = {
    (opened, conversation): _write_statement(opened=opened, conversation=conversation)
    for opened in (False, True)
    for conversation in (None, "joins", "releases")
}


def _json(value: Any) -> str:
    return orjson.dumps(value).decode()


def _thread_taken(error: asyncpg.UniqueViolationError | IntegrityError) -> bool:
    """Whether a write was refused by the unique index on (thread, depth). Postgres names the index;
    SQLite its columns."""
    if isinstance(error, asyncpg.UniqueViolationError):
        return bool(error.constraint_name == THREAD_INDEX)
    return "responses.thread, responses.depth" in str(error.orig)


def _parent(row: Sequence[Any]) -> ParentTurn | None:
    """A ParentTurn from `_parent_query`'s columns; None when they are NULL (no parent, or not live)."""
    if row[0] is None:
        return None
    response = StoredResponse(*row[:_N_RESPONSE])
    response.output = row[-1] or []
    prefix_values = row[_N_RESPONSE : _N_RESPONSE + _N_PREFIX]
    prefix = None if prefix_values[0] is None else StoredPrefix(*prefix_values)
    return ParentTurn(response, prefix, thread_taken=row[-2])


class TurnStore:
    def __init__(
        self, engine: AsyncEngine, responses: ResponseStore, conversations: ConversationStore
    ) -> None:
        self.engine = engine
        self.responses = responses
        self.conversations = conversations
        self._postgres = engine.dialect.name == "postgresql"

    async def _fetch(self, statement: _Statement, values: Mapping[str, Any]) -> list[Sequence[Any]]:
        return await fetch(self.engine, statement.sql, *statement.args(values))

    @db_call
    async def load_parent(self, tenant: str, response_id: str, now: float) -> ParentTurn | None:
        """The parent of a turn given `previous_response_id`: one round trip."""
        if not self._postgres:
            return await self.responses.load_parent(tenant, response_id)
        rows = await self._fetch(_PARENT, {"tenant": tenant, "now": now, "response_id": response_id})
        return _parent(rows[0]) if rows else None

    @db_call
    async def begin(
        self, tenant: str, conversation_id: str, response_id: str, lease_seconds: float, now: float
    ) -> tuple[ConversationTurn, ParentTurn | None] | None:
        """Take the conversation's turn lock (or one whose lease lapsed) and load its head, the turn's
        parent: one round trip. None if the conversation is unknown; conversation_locked if a live turn
        holds it."""
        if not self._postgres:
            turn = await self.conversations.begin_turn(
                tenant, conversation_id, response_id, lease_seconds, now
            )
            if turn is None:
                return None
            head = turn.head_response_id
            return turn, None if head is None else await self.responses.load_parent(tenant, head)
        values = {
            "tenant": tenant,
            "conversation_id": conversation_id,
            "response_id": response_id,
            "lock_expires_at": now + lease_seconds,
            "now": now,
        }
        rows = await self._fetch(_BEGIN, values)
        if not rows:
            await self.conversations.refuse_turn(tenant, conversation_id, now)
            return None
        version, head, next_position, *parent = rows[0]
        return ConversationTurn(version, head, next_position), _parent(parent)

    @db_call
    async def open(self, turn: TurnWrite, lease_expires_at: float) -> str:
        """A queued or running response as accepted: its row with its input items and a lease, no output
        yet; readable at once from any replica. One round trip on Postgres. Returns the thread it was
        stored in (see `_in_thread`), which its output items must carry when it finishes."""
        return await self._in_thread(turn, lambda chosen: self._open(chosen, lease_expires_at))

    async def _open(self, turn: TurnWrite, lease_expires_at: float) -> None:
        if not self._postgres:
            await self.responses.open_turn(turn, lease_expires_at)
            return
        await self._fetch(_WRITES[False, None], self._values(turn, None, lease_expires_at, opened=False))

    @db_call
    async def write(self, turn: TurnWrite, conversation: ConversationAppend | None, *, opened: bool) -> str:
        """Commit a finished turn whole: its row (inserted, or the `opened` one moved on from in
        progress), items and prefix record, and in a conversation the append that places its items,
        moves the head and frees the lock (a failed turn only frees it). One round trip on Postgres
        (two when it lost a race for its thread: `_in_thread`). LeaseLost if the open row was finalized
        elsewhere meanwhile, conversation_locked if the turn's lock lapsed and another turn took it;
        nothing is written then. Returns the thread it is in."""
        return await self._in_thread(turn, lambda chosen: self._write(chosen, conversation, opened=opened))

    @staticmethod
    async def _in_thread(turn: TurnWrite, insert: Callable[[TurnWrite], Awaitable[None]]) -> str:
        """Run `insert` with the thread the turn chose; if another child of the same parent claimed that
        thread since the parent was read (the unique index on thread and depth refused the row, and
        nothing was written), once more as the first response of a thread of its own. The thread it
        was stored in."""
        response = turn.response
        try:
            await insert(turn)
        except (asyncpg.UniqueViolationError, IntegrityError) as error:
            if response.thread == response.id or not _thread_taken(error):
                raise
            await insert(replace(turn, response=replace(response, thread=response.id)))
            return response.id
        return response.thread

    async def _write(self, turn: TurnWrite, conversation: ConversationAppend | None, *, opened: bool) -> None:
        if not self._postgres:
            await self._write_in_transaction(turn, conversation, opened=opened)
            return
        kind = None if conversation is None else "joins" if conversation.joins else "releases"
        values = self._values(turn, conversation, None, opened=opened)
        (written, held), *_ = await self._fetch(_WRITES[opened, kind], values)
        if not held:
            assert conversation is not None
            raise conversation_locked(conversation.id)
        if not written:
            raise LeaseLost()

    @staticmethod
    def _values(
        turn: TurnWrite,
        conversation: ConversationAppend | None,
        lease_expires_at: float | None,
        *,
        opened: bool,
    ) -> dict[str, Any]:
        """The write statements' parameters: the rows as JSON, items placed in the conversation when the
        turn joins one (an opened turn's input is stored already: only its output is new)."""
        response = turn.response
        now = response.completed_at or response.created_at
        inputs = [] if opened else turn.input_items
        items = [item_row(response, INPUT_SEGMENT, i, item, now) for i, item in enumerate(inputs)]
        items += [
            item_row(response, OUTPUT_SEGMENT, i, item, now) for i, item in enumerate(turn.output_items)
        ]
        start = conversation.next_position if conversation is not None and conversation.joins else None
        if conversation is not None and start is not None:
            first = start + (len(turn.input_items) if opened else 0)
            for position, row in enumerate(items, first):
                row.update(conversation_id=conversation.id, conversation_position=position)
        return {
            "response": _json(response_row(turn, lease_expires_at)),
            "items": _json(items),
            "prefix": None if turn.prefix is None else _json(prefix_row(response, turn.prefix)),
            "response_id": response.id,
            "tenant": response.tenant,
            "conversation_id": conversation.id if conversation is not None else None,
            "next_position": start,
            "item_count": len(turn.input_items) + len(turn.output_items),
        }

    async def _write_in_transaction(
        self, turn: TurnWrite, conversation: ConversationAppend | None, *, opened: bool
    ) -> None:
        response = turn.response
        async with unit_of_work(self.engine) as uow:
            if not opened:
                await self.responses.write_turn(uow, turn)
            elif not await self.responses.finish(uow, turn):
                raise LeaseLost()
            if conversation is None:
                return
            if not conversation.joins:
                await self.conversations.release_turn(uow, response.tenant, conversation.id, response.id)
                return
            item_ids = [item["id"] for item in (*turn.input_items, *turn.output_items)]
            await self.conversations.finish_turn(uow, response.tenant, conversation.id, response.id, item_ids)
