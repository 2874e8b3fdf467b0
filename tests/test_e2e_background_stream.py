"""Background responses created with `stream: true`, over real HTTP with the official SDK: the creating
client streams them, `retrieve(id, stream=True)` replays every event from any replica and follows the
live ones, `starting_after` resumes after a sequence number, a cancel ends the stream, and a response
whose producer died still gets its terminal event."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import openai
import pytest
from openai.types.responses import ResponseFailedEvent
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from service.domain.items import normalize_input
from service.store.events import EventStore
from service.store.models import ResponseEvent
from service.store.responses import ResponseStore, TurnWrite
from service.workers.retention import retention_pass
from tests.conftest import Service
from tests.factories import stored_response

MODEL = "ref-chatml"


def _dump(events: list[Any]) -> list[dict[str, Any]]:
    return [event.model_dump(mode="json", exclude_unset=True) for event in events]


@contextmanager
def slow_stream(backend_admin: httpx.Client, chunk_delay_ms: int) -> Iterator[None]:
    backend_admin.post("/admin/stream", json={"chunk_delay_ms": chunk_delay_ms}).raise_for_status()
    try:
        yield
    finally:
        backend_admin.post("/admin/stream", json={}).raise_for_status()


def test_create_streams_and_retrieve_replays_every_event(service: Service) -> None:
    client = service.openai()
    created = _dump(list(client.responses.create(model=MODEL, input="tell me", background=True, stream=True)))
    kinds = [event["type"] for event in created]
    assert kinds[:3] == ["response.created", "response.queued", "response.in_progress"], kinds
    assert kinds[-1] == "response.completed" and "response.output_text.delta" in kinds
    assert [event["sequence_number"] for event in created] == list(range(len(created)))
    assert created[0]["response"]["status"] == "queued" and created[0]["response"]["background"] is True
    response_id = created[0]["response"]["id"]
    assert _dump(list(client.responses.retrieve(response_id, stream=True))) == created
    # Resumed after a sequence number: exactly the events after it; after the last one, none.
    assert _dump(list(client.responses.retrieve(response_id, stream=True, starting_after=4))) == created[5:]
    assert list(client.responses.retrieve(response_id, stream=True, starting_after=len(created) - 1)) == []
    assert (
        client.responses.retrieve(response_id).output_text
        == created[-1]["response"]["output"][0]["content"][0]["text"]
    )


def test_another_replica_follows_a_running_stream(service_factory: Any, backend_admin: httpx.Client) -> None:
    first: Service = service_factory("postgres")
    second: Service = service_factory("postgres", reaper_interval=13.0)  # another process, same database
    with slow_stream(backend_admin, 100):
        stream = first.openai().responses.create(
            model=MODEL, input="a long one", background=True, stream=True, max_output_tokens=40
        )
        iterator = iter(stream)
        opening = [next(iterator), next(iterator)]
        assert opening[0].type == "response.created"
        response_id = opening[0].response.id
        followed = list(second.openai().responses.retrieve(response_id, stream=True))
        created = opening + list(iterator)
    assert _dump(followed) == _dump(created)
    assert followed[-1].type == "response.completed"


def test_a_cancel_from_another_replica_ends_the_stream(
    service_factory: Any, backend_admin: httpx.Client
) -> None:
    first: Service = service_factory("postgres")
    second: Service = service_factory("postgres", reaper_interval=13.0)
    with slow_stream(backend_admin, 200):
        stream = first.openai().responses.create(
            model=MODEL, input="a long one", background=True, stream=True, max_output_tokens=200
        )
        iterator = iter(stream)
        created = next(iterator)
        assert created.type == "response.created"
        response_id = created.response.id
        while next(iterator).type != "response.output_text.delta":
            pass
        follower: list[Any] = []
        following = threading.Thread(
            target=lambda: follower.extend(second.openai().responses.retrieve(response_id, stream=True))
        )
        following.start()
        assert second.openai().responses.cancel(response_id).status == "cancelled"
        rest = list(iterator)
        following.join(timeout=30)
    assert rest[-1].type == "response.failed" and rest[-1].response.status == "cancelled"
    assert follower[-1].type == "response.failed" and follower[-1].response.status == "cancelled"
    assert follower[-1].sequence_number == rest[-1].sequence_number


def test_a_cancelled_stream_frees_its_conversation(service: Service, backend_admin: httpx.Client) -> None:
    client = service.openai()
    conversation = client.conversations.create().id
    with slow_stream(backend_admin, 200):
        stream = client.responses.create(
            model=MODEL,
            input="a long one",
            conversation=conversation,
            background=True,
            stream=True,
            max_output_tokens=200,
        )
        events = iter(stream)
        created = next(events)
        assert created.type == "response.created"
        while next(events).type != "response.output_text.delta":
            pass
        client.responses.cancel(created.response.id)
        assert [event.type for event in events][-1] == "response.failed"
    # The next turn goes through at once, not after the cancelled turn's lease.
    assert client.responses.create(model=MODEL, input="next", conversation=conversation).status == "completed"


def test_a_stream_whose_producer_died_still_ends(service: Service, pg_engine: AsyncEngine) -> None:
    """A response the reaper failed after its process died, with only its first events recorded."""
    events, responses = EventStore(pg_engine), ResponseStore(pg_engine)
    now = time.time()
    running = stored_response(service.tenant, status="in_progress", background=True, completed_at=None)

    async def die_mid_stream() -> None:
        await responses.open_turn(TurnWrite(running, now + 60, normalize_input("hi"), [], None), now - 1)
        opening = [
            {"type": kind, "sequence_number": number, "response": running}
            for number, kind in enumerate(("response.created", "response.queued", "response.in_progress"))
        ]
        await events.append(service.tenant, running.id, now + 60, opening, now)

    asyncio.run(die_mid_stream())
    client = service.openai()
    # Followed while the reaper has not run yet (the lease lapsed a second ago): the stream ends once it
    # has failed the response (it runs every 10 s), with a terminal event made from the stored row.
    follower = list(client.responses.retrieve(running.id, stream=True))
    assert [event.type for event in follower] == [
        "response.created",
        "response.queued",
        "response.in_progress",
        "response.failed",
    ]
    last = follower[-1]
    assert isinstance(last, ResponseFailedEvent)
    assert last.sequence_number == 3 and last.response.status == "failed"


def test_a_stream_keeps_a_bounded_number_of_events(service_factory: Any, backend_admin: httpx.Client) -> None:
    service: Service = service_factory("postgres", stream_events_max=8)
    client = service.openai()
    created = _dump(
        list(
            client.responses.create(
                model=MODEL, input="go on", background=True, stream=True, max_output_tokens=100
            )
        )
    )
    assert len(created) > 8
    replayed = _dump(list(client.responses.retrieve(created[0]["response"]["id"], stream=True)))
    assert replayed == created[:7] + created[-1:]  # the first ones, then the terminal event


def test_only_streamed_background_responses_stream_again(service: Service) -> None:
    client = service.openai()
    polled = client.responses.create(model=MODEL, input="x", background=True)
    with pytest.raises(openai.BadRequestError) as raised:
        list(client.responses.retrieve(polled.id, stream=True))
    assert (raised.value.code, raised.value.param) == ("unsupported_value", "stream")
    with pytest.raises(openai.NotFoundError):
        list(client.responses.retrieve("resp_" + uuid.uuid4().hex, stream=True))
    bad = service.http().get(f"/v1/responses/{polled.id}", params={"stream": "true", "starting_after": -2})
    assert (bad.status_code, bad.json()["error"]["param"]) == (400, "starting_after"), bad.text


async def test_expired_events_are_deleted(pg_engine: AsyncEngine) -> None:
    events, responses, tenant = EventStore(pg_engine), ResponseStore(pg_engine), uuid.uuid4().hex
    now = time.time()
    kept, gone = stored_response(tenant), stored_response(tenant)
    for response in (kept, gone):
        await responses.open_turn(TurnWrite(response, now + 60, [], [], None), now + 15)
        await events.append(
            tenant,
            response.id,
            now + (60 if response is kept else -1),
            [{"type": "response.created", "sequence_number": 0, "response": response}],
            now,
        )
    assert await retention_pass(events.purge, batch=1) >= 1
    async with pg_engine.connect() as conn:
        left = await conn.execute(
            select(ResponseEvent.response_id, func.count())
            .where(ResponseEvent.tenant == tenant)
            .group_by(ResponseEvent.response_id)
        )
        assert dict(left.all()) == {kept.id: 1}
