"""Migrations go up, down and up again on both dialects, and a downgrade never loses a turn's items."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from sqlalchemy import text

from service.domain.threads import choose_thread
from service.store.conversations import ConversationStore
from service.store.db import create_engine, dispose
from service.store.migrate import current_revision, downgrade, head_revision, upgrade
from service.store.responses import ResponseStore, TurnWrite
from service.store.turns import TurnStore
from tests.factories import stored_response


async def _scalar(url: str, sql: str) -> Any:
    engine = create_engine(url)
    try:
        async with engine.connect() as conn:
            return (await conn.execute(text(sql))).scalar()
    finally:
        await dispose(engine)


async def _all(url: str, sql: str) -> list[tuple[Any, ...]]:
    engine = create_engine(url)
    try:
        async with engine.connect() as conn:
            return [tuple(row) for row in await conn.execute(text(sql))]
    finally:
        await dispose(engine)


async def _execute(url: str, sql: str) -> None:
    engine = create_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.execute(text(sql))
    finally:
        await dispose(engine)


async def _revision(url: str) -> str | None:
    engine = create_engine(url)
    try:
        return await current_revision(engine)
    finally:
        await dispose(engine)


def _empty_database(dialect: str, new_postgres_database: Any, tmp_path: Any) -> str:
    """A database with no tables yet, for a migration test on `dialect`."""
    return new_postgres_database() if dialect == "postgres" else f"sqlite+aiosqlite:///{tmp_path / 'm.db'}"


@pytest.mark.parametrize("dialect", ["sqlite", "postgres"])
def test_up_down_up_keeps_items(dialect: str, new_postgres_database: Any, tmp_path: Any) -> None:
    url = _empty_database(dialect, new_postgres_database, tmp_path)
    upgrade(url)
    assert asyncio.run(_revision(url)) == head_revision()
    engine_sql = [
        "INSERT INTO responses (id, tenant, model, status, depth, settings, store, background,"
        " cancel_requested, created_at, expires_at, thread)"
        " VALUES ('resp_1', 't', 'm', 'completed', 0, '{}', true, false, false, 0, 1, 'resp_1')",
        "INSERT INTO items (id, tenant, response_id, segment, position, type, payload, created_at, thread,"
        " depth) VALUES ('msg_1', 't', 'resp_1', 0, 0, 'message', '{}', 0, 'resp_1', 0)",
    ]

    async def seed() -> None:
        engine = create_engine(url)
        try:
            async with engine.begin() as conn:
                for statement in engine_sql:
                    await conn.execute(text(statement))
        finally:
            await dispose(engine)

    asyncio.run(seed())
    downgrade(url, "0002")
    assert asyncio.run(_scalar(url, "SELECT count(*) FROM items")) == 1
    upgrade(url)
    assert asyncio.run(_scalar(url, "SELECT count(*) FROM items")) == 1
    downgrade(url, "base")
    assert asyncio.run(_revision(url)) is None
    upgrade(url)
    assert asyncio.run(_revision(url)) == head_revision()


@pytest.mark.parametrize("dialect", ["sqlite", "postgres"])
def test_0005_gives_existing_responses_their_lineage_root(
    dialect: str, new_postgres_database: Any, tmp_path: Any
) -> None:
    url = _empty_database(dialect, new_postgres_database, tmp_path)
    upgrade(url, "0004")
    insert = (
        "INSERT INTO responses (id, tenant, model, status, depth, settings, store, background,"
        " cancel_requested, created_at, expires_at, previous_response_id, conversation_id) VALUES"
        " (:id, 't', 'm', 'completed', :depth, '{}', true, false, false, 0, 1, :previous, :conversation)"
    )
    rows = [
        {"id": "resp_a", "depth": 0, "previous": None, "conversation": None},
        {"id": "resp_b", "depth": 1, "previous": "resp_a", "conversation": None},
        {"id": "resp_c", "depth": 2, "previous": "resp_b", "conversation": None},
        {"id": "resp_d", "depth": 0, "previous": None, "conversation": "conv_1"},
        {"id": "resp_e", "depth": 1, "previous": None, "conversation": "conv_1"},
    ]

    async def seed() -> None:
        engine = create_engine(url)
        try:
            async with engine.begin() as conn:
                conversation = "INSERT INTO conversations (id, tenant, metadata, created_at)"
                await conn.execute(text(f"{conversation} VALUES ('conv_1', 't', '{{}}', 0)"))
                for row in rows:
                    await conn.execute(text(insert), row)
        finally:
            await dispose(engine)

    asyncio.run(seed())
    upgrade(url)
    assert asyncio.run(_all(url, "SELECT id, lineage_root FROM responses ORDER BY id")) == [
        ("resp_a", "resp_a"),
        ("resp_b", "resp_a"),
        ("resp_c", "resp_a"),
        ("resp_d", "conv_1"),  # conversation turns chain through the conversation, not previous_response_id
        ("resp_e", "conv_1"),
    ]
    downgrade(url, "0004")
    upgrade(url)
    assert asyncio.run(_revision(url)) == head_revision()


@pytest.mark.parametrize("dialect", ["sqlite", "postgres"])
def test_0006_places_existing_conversation_turns(
    dialect: str, new_postgres_database: Any, tmp_path: Any
) -> None:
    url = _empty_database(dialect, new_postgres_database, tmp_path)
    upgrade(url, "0005")
    response = (
        "INSERT INTO responses (id, tenant, model, status, depth, settings, store, background,"
        " cancel_requested, created_at, expires_at, conversation_id) VALUES"
        " (:id, 't', 'm', :status, 0, '{}', true, false, false, 0, 1, 'conv_1')"
    )
    item = (
        "INSERT INTO items (id, tenant, response_id, segment, position, type, payload, created_at,"
        " conversation_id, conversation_position) VALUES (:id, 't', :response, 0, 0, 'message', '{}', 0,"
        " :conversation, :place)"
    )

    async def seed() -> None:
        engine = create_engine(url)
        try:
            async with engine.begin() as conn:
                conversation = "INSERT INTO conversations (id, tenant, metadata, created_at)"
                await conn.execute(text(f"{conversation} VALUES ('conv_1', 't', '{{}}', 0)"))
                await conn.execute(
                    text(response),
                    [{"id": "resp_a", "status": "completed"}, {"id": "resp_f", "status": "failed"}],
                )
                await conn.execute(
                    text(item),
                    [
                        {"id": "msg_0", "response": None, "conversation": "conv_1", "place": 0},
                        {"id": "msg_1", "response": "resp_a", "conversation": "conv_1", "place": 1},
                        {"id": "msg_2", "response": "resp_a", "conversation": "conv_1", "place": 2},
                        {"id": "msg_3", "response": "resp_f", "conversation": None, "place": None},
                    ],
                )
        finally:
            await dispose(engine)

    asyncio.run(seed())
    upgrade(url)
    assert asyncio.run(_all(url, "SELECT id, conversation_start FROM responses ORDER BY id")) == [
        ("resp_a", 1),
        ("resp_f", None),  # never appended: cannot be placed
    ]


# A child of resp_c as the version before 0012 writes it on Postgres: one statement, no thread.
_PREVIOUS_VERSION_WRITE = """
WITH resp AS (
    INSERT INTO responses (id, tenant, model, status, depth, settings, store, background, cancel_requested,
                           created_at, expires_at, previous_response_id, lineage_root)
    VALUES ('resp_o', 't', 'm', 'completed', 3, '{}', true, false, false, 0, 1e12, 'resp_c', 'resp_a')
    RETURNING id)
INSERT INTO items (id, tenant, response_id, segment, position, type, payload, created_at)
SELECT 'resp_o.' || s, 't', resp.id, s, 0, 'message', jsonb_build_object('id', 'resp_o.' || s), 0
  FROM resp, generate_series(0, 1) s
"""


@pytest.mark.parametrize("dialect", ["sqlite", "postgres"])
def test_0012_makes_existing_responses_threads_of_their_own_that_new_turns_continue(
    dialect: str, new_postgres_database: Any, tmp_path: Any
) -> None:
    url = _empty_database(dialect, new_postgres_database, tmp_path)
    upgrade(url, "0011")
    response = (
        "INSERT INTO responses (id, tenant, model, status, depth, settings, store, background,"
        " cancel_requested, created_at, expires_at, previous_response_id, lineage_root) VALUES"
        " (:id, 't', 'm', 'completed', :depth, '{}', true, false, false, 0, 1e12, :previous, 'resp_a')"
    )
    item = (
        "INSERT INTO items (id, tenant, response_id, segment, position, type, payload, created_at)"
        " VALUES (:id, 't', :response, :segment, 0, 'message', :payload, 0)"
    )
    # A chain a -> b -> c and a fork a -> d.
    lineage = {"resp_a": (0, None), "resp_b": (1, "resp_a"), "resp_c": (2, "resp_b"), "resp_d": (1, "resp_a")}

    async def seed() -> None:
        engine = create_engine(url)
        try:
            async with engine.begin() as conn:
                for response_id, (depth, previous) in lineage.items():
                    await conn.execute(
                        text(response), {"id": response_id, "depth": depth, "previous": previous}
                    )
                    for segment in (0, 1):
                        payload = f'{{"id": "{response_id}.{segment}"}}'
                        await conn.execute(
                            text(item),
                            {
                                "id": f"{response_id}.{segment}",
                                "response": response_id,
                                "segment": segment,
                                "payload": payload,
                            },
                        )
        finally:
            await dispose(engine)

    asyncio.run(seed())
    upgrade(url)
    if dialect == "postgres":
        # The previous version, still running during a rolling update, writes a child of c without a
        # thread, in its one-statement shape: the triggers make it a thread of its own, readable as one.
        asyncio.run(_execute(url, _PREVIOUS_VERSION_WRITE))
        lineage["resp_o"] = (3, "resp_c")
    assert asyncio.run(_all(url, "SELECT id, thread FROM responses ORDER BY id")) == [
        (response_id, response_id) for response_id in sorted(lineage)
    ]
    assert asyncio.run(_all(url, "SELECT id, thread, depth FROM items ORDER BY id")) == [
        (f"{response_id}.{segment}", response_id, lineage[response_id][0])
        for response_id in sorted(lineage)
        for segment in (0, 1)
    ]

    async def continue_and_read() -> dict[str, list[str]]:
        """A new turn after c and one after a (whose thread is free: b and d are threads of their own),
        then every history."""
        engine = create_engine(url)
        try:
            responses = ResponseStore(engine)
            turns = TurnStore(engine, responses, ConversationStore(engine))
            continued = [("resp_c", "resp_e"), ("resp_a", "resp_f")]
            if "resp_o" in lineage:
                continued.append(("resp_o", "resp_g"))
            for parent_id, child_id in continued:
                parent = await turns.load_parent("t", parent_id, time.time())
                assert parent is not None and not parent.thread_taken
                child = stored_response(
                    "t",
                    id=child_id,
                    previous_response_id=parent_id,
                    depth=parent.response.depth + 1,
                    thread=choose_thread(child_id, parent.response.thread, parent_thread_taken=False),
                )
                write = TurnWrite(
                    child, time.time() + 60, [{"id": f"{child_id}.0", "type": "message"}], [], None
                )
                assert await turns.write(write, None, opened=False) == parent_id
            return {
                response_id: [
                    item["id"] for _, items in await responses.history("t", response_id) for item in items
                ]
                for response_id in (*lineage, *(child for _, child in continued))
            }
        finally:
            await dispose(engine)

    histories = asyncio.run(continue_and_read())
    both = ("0", "1")
    assert histories == {
        "resp_a": [f"resp_a.{s}" for s in both],
        "resp_b": [f"resp_{r}.{s}" for r in "ab" for s in both],
        "resp_c": [f"resp_{r}.{s}" for r in "abc" for s in both],
        "resp_d": [f"resp_{r}.{s}" for r in "ad" for s in both],
        "resp_e": [*(f"resp_{r}.{s}" for r in "abc" for s in both), "resp_e.0"],
        "resp_f": [*(f"resp_a.{s}" for s in both), "resp_f.0"],
    } | (
        {
            "resp_o": [f"resp_{r}.{s}" for r in "abco" for s in both],
            "resp_g": [*(f"resp_{r}.{s}" for r in "abco" for s in both), "resp_g.0"],
        }
        if dialect == "postgres"
        else {}
    )
    downgrade(url, "0011")
    upgrade(url)
    assert asyncio.run(_revision(url)) == head_revision()
