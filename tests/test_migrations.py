"""Migrations go up, down and up again on both dialects, and a downgrade never loses a turn's items."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from sqlalchemy import text

from service.store.db import create_engine, dispose
from service.store.migrate import current_revision, downgrade, head_revision, upgrade


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


async def _revision(url: str) -> str | None:
    engine = create_engine(url)
    try:
        return await current_revision(engine)
    finally:
        await dispose(engine)


@pytest.mark.parametrize("dialect", ["sqlite", "postgres"])
def test_up_down_up_keeps_items(dialect: str, new_postgres_database: Any, tmp_path: Any) -> None:
    url = new_postgres_database() if dialect == "postgres" else f"sqlite+aiosqlite:///{tmp_path / 'm.db'}"
    upgrade(url)
    assert asyncio.run(_revision(url)) == head_revision()
    engine_sql = [
        "INSERT INTO responses (id, tenant, model, status, depth, settings, store, background,"
        " cancel_requested, created_at, expires_at)"
        " VALUES ('resp_1', 't', 'm', 'completed', 0, '{}', true, false, false, 0, 1)",
        "INSERT INTO items (id, tenant, response_id, segment, position, type, payload, created_at)"
        " VALUES ('msg_1', 't', 'resp_1', 0, 0, 'message', '{}', 0)",
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
    url = new_postgres_database() if dialect == "postgres" else f"sqlite+aiosqlite:///{tmp_path / 'm.db'}"
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
    url = new_postgres_database() if dialect == "postgres" else f"sqlite+aiosqlite:///{tmp_path / 'm.db'}"
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
