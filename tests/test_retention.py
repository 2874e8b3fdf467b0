"""Retention: an expired response is gone from every read at once, and from the tables after a retention
pass (with its items and prefix record); conversation items stay; a live descendant keeps its ancestors."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from service.domain.items import normalize_input
from service.serving import ServerThread
from service.store.conversations import ConversationStore
from service.store.db import create_engine, dispose
from service.store.migrate import upgrade
from service.store.models import Conversation, Item, PrefixRecord, Response
from service.store.responses import ResponseStore, TurnWrite
from service.store.retention import RetentionStore
from service.store.unit import unit_of_work
from service.workers.retention import retention_pass
from tests.conftest import Service, new_tenant, start_service
from tests.factories import prefix_write, stored_response

MODEL = "ref-chatml"
SECONDS = 1 / 86400


async def _rows(url: str, response_ids: list[str]) -> dict[str, int]:
    engine = create_engine(url)
    try:
        async with engine.connect() as conn:

            async def count(table: Any, column: Any) -> int:
                query = select(func.count()).select_from(table).where(column.in_(response_ids))
                return int((await conn.execute(query)).scalar_one())

            return {
                "responses": await count(Response, Response.id),
                "items": await count(Item, Item.response_id),
                "prefix_records": await count(PrefixRecord, PrefixRecord.response_id),
            }
    finally:
        await dispose(engine)


@pytest.fixture
def lone_service(new_postgres_database: Any, reference_backend: ServerThread) -> Iterator[Service]:
    """A service alone on its database, its retention worker an hour apart: every service of the session
    runs retention passes on the shared database, and one landing between a response's expiry and the
    test's look at it would purge what the test means to see expired first."""
    url = new_postgres_database()
    upgrade(url)
    service = start_service(url, reference_backend.url, retention_interval=3600)
    yield service
    service.server.stop()


def test_expired_responses_are_gone_from_reads_at_once_and_from_tables_after_a_pass(
    lone_service: Service,
) -> None:
    service = lone_service
    tenant = new_tenant(service.settings.database_url)
    client, admin = service.openai(tenant.user_key), service.admin()
    keeper = client.responses.create(model=MODEL, input="kept at the default retention").id
    admin.set_retention(tenant.tenant, 2 * SECONDS)
    root = client.responses.create(model=MODEL, input="short-lived")
    child = client.responses.create(model=MODEL, input="also", previous_response_id=root.id)
    conversation = client.conversations.create(items=[{"role": "user", "content": "kept"}]).id
    in_conversation = client.responses.create(model=MODEL, input="turn", conversation=conversation)
    items_before = [item.id for item in client.conversations.items.list(conversation, order="asc")]
    doomed = [root.id, child.id, in_conversation.id]
    assert asyncio.run(_rows(service.settings.database_url, doomed))["prefix_records"] == 3
    time.sleep(2.2)

    http = service.http(tenant.user_key)
    for response_id in doomed:
        assert http.get(f"/v1/responses/{response_id}").status_code == 404
        assert http.get(f"/v1/responses/{response_id}/input_items").status_code == 404
        assert http.post(f"/v1/responses/{response_id}/cancel").status_code == 404
        assert http.delete(f"/v1/responses/{response_id}").status_code == 404
    with pytest.raises(openai.BadRequestError) as continued:
        client.responses.create(model=MODEL, input="more", previous_response_id=child.id)
    assert continued.value.code == "previous_response_not_found"
    assert admin.lineage(child.id)["turns"][-1]["expired"] is True
    assert client.responses.retrieve(keeper).status == "completed"

    assert admin.run_retention()["deleted_responses"] >= 3
    assert asyncio.run(_rows(service.settings.database_url, doomed)) == {
        "responses": 0,
        "items": 0,
        "prefix_records": 0,
    }
    # Conversation items do not expire, and the conversation goes on (in full: its head is gone).
    assert [item.id for item in client.conversations.items.list(conversation, order="asc")] == items_before
    raw = client.responses.with_raw_response.create(model=MODEL, input="again", conversation=conversation)
    assert raw.parse().status == "completed"
    assert client.responses.retrieve(keeper).status == "completed"


async def test_a_live_descendant_keeps_its_expired_ancestors(engine: AsyncEngine) -> None:
    store, retention, tenant = ResponseStore(engine), RetentionStore(engine), uuid.uuid4().hex
    now = time.time()
    old = stored_response(tenant, created_at=now - 10)
    young = stored_response(tenant, previous_response_id=old.id, depth=1, lineage_root=old.id)
    alone = stored_response(tenant)
    for response, expires_at in ((old, now - 5), (young, now + 60), (alone, now - 5)):
        items = normalize_input(f"in {response.id}")
        async with unit_of_work(engine) as uow:
            await store.write_turn(uow, TurnWrite(response, expires_at, items, [], prefix_write("pc")))
    assert await store.get(tenant, old.id) is None  # expired: gone from reads
    assert await store.get(tenant, young.id) is not None
    assert await retention_pass(retention.purge, batch=1) >= 1
    assert [segment for segment in await store.history(tenant, young.id)]  # the ancestor's items remain
    async with engine.connect() as conn:
        left = set((await conn.execute(select(Response.id).where(Response.tenant == tenant))).scalars())
    assert left == {old.id, young.id}


async def test_expired_conversation_turns_leave_their_items_to_the_conversation(engine: AsyncEngine) -> None:
    conversations, store = ConversationStore(engine), ResponseStore(engine)
    tenant, now = uuid.uuid4().hex, time.time()
    conversation = await conversations.create(tenant, metadata={}, items=normalize_input("hello"), now=now)
    turn = await conversations.begin_turn(tenant, conversation.id, "resp_x", 30, now)
    assert turn is not None
    response = stored_response(tenant, id="resp_" + uuid.uuid4().hex, conversation_id=conversation.id)
    items = normalize_input("a turn")
    async with unit_of_work(engine) as uow:
        await store.write_turn(uow, TurnWrite(response, now - 1, items, [], prefix_write("pc")))
        await conversations.finish_turn(uow, tenant, conversation.id, "resp_x", [items[0]["id"]])
    assert await retention_pass(RetentionStore(engine).purge, batch=10) >= 1
    history = await conversations.history(tenant, conversation.id)
    assert [item["id"] for _, segment in history for item in segment][-1] == items[0]["id"]
    async with engine.connect() as conn:
        version = (
            await conn.execute(select(Conversation.version).where(Conversation.id == conversation.id))
        ).scalar()
    assert version == 1  # bumped: no handle built on the old segmentation is reused
