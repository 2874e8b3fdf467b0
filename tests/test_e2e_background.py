"""Background mode over real HTTP: queued at once, polled to completion, cancelled from any replica, and
a cancel that races completion told the truth."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import openai
import pytest
from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncEngine

from service.store.models import Response
from tests.conftest import Service


def _poll(client: openai.OpenAI, response_id: str, until: tuple[str, ...]) -> Any:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        response = client.responses.retrieve(response_id)
        if response.status in until:
            return response
        time.sleep(0.05)
    raise AssertionError(f"{response_id} did not reach {until}")


def test_background_create_poll_and_continue(service: Service) -> None:
    client = service.openai()
    queued = client.responses.create(model="ref-chatml", input="take your time", background=True)
    assert queued.status == "queued" and queued.background is True and queued.output == []
    assert queued.completed_at is None
    done = _poll(client, queued.id, ("completed",))
    assert done.output_text and done.usage is not None
    follow = client.responses.create(model="ref-chatml", input="and then?", previous_response_id=done.id)
    assert follow.status == "completed"


def test_cancel_from_another_replica(service_factory: Any, backend_admin: httpx.Client) -> None:
    first: Service = service_factory("postgres")
    second: Service = service_factory("postgres", reaper_interval=14.0)  # another process, same database
    backend_admin.post("/admin/latency", json={"ms": 3000}).raise_for_status()
    try:
        queued = first.openai().responses.create(model="ref-chatml", input="slow", background=True)
        _poll(first.openai(), queued.id, ("in_progress",))
        cancelled = second.openai().responses.cancel(queued.id)
        assert cancelled.status == "cancelled"
        again = second.openai().responses.cancel(queued.id)  # idempotent
        assert again.status == "cancelled"
    finally:
        backend_admin.post("/admin/latency", json={"ms": 0}).raise_for_status()
    time.sleep(1.5)  # the worker's next heartbeat sees the cancel and stops
    assert first.openai().responses.retrieve(queued.id).status == "cancelled"


def test_cancel_rules(service: Service) -> None:
    client = service.openai()
    foreground = client.responses.create(model="ref-chatml", input="now")
    with pytest.raises(openai.BadRequestError):
        client.responses.cancel(foreground.id)
    background = client.responses.create(model="ref-chatml", input="later", background=True)
    _poll(client, background.id, ("completed",))
    with pytest.raises(openai.ConflictError) as caught:
        client.responses.cancel(background.id)
    assert caught.value.code == "response_not_cancellable"
    with pytest.raises(openai.NotFoundError):
        client.responses.cancel("resp_missing")
    reply = service.http().post(
        "/v1/responses", json={"model": "ref-chatml", "input": "x", "background": True, "store": False}
    )
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "background"


async def test_a_cancel_that_loses_to_completion_says_so(
    service: Service, backend_admin: httpx.Client, pg_engine: AsyncEngine
) -> None:
    """The response completes while the cancel waits on its row: the cancel must report the true final
    state (409, completed), never 200 with a status it did not set."""
    client = openai.AsyncOpenAI(base_url=f"{service.url}/v1", api_key=service.api_key, max_retries=0)
    backend_admin.post("/admin/latency", json={"ms": 3000}).raise_for_status()
    try:
        queued = await client.responses.create(model="ref-chatml", input="race me", background=True)
        for _ in range(200):
            if (await client.responses.retrieve(queued.id)).status == "in_progress":
                break
            await asyncio.sleep(0.05)
        async with pg_engine.begin() as conn:
            # Completion commits while holding the row: the cancel's UPDATE queues behind it.
            await conn.execute(
                update(Response)
                .where(Response.id == queued.id)
                .values(status="completed", completed_at=time.time(), lease_expires_at=None)
            )
            cancel = asyncio.create_task(client.responses.cancel(queued.id))
            await asyncio.sleep(0.5)
            assert not cancel.done()
        with pytest.raises(openai.ConflictError) as caught:
            await cancel
    finally:
        backend_admin.post("/admin/latency", json={"ms": 0}).raise_for_status()
    assert caught.value.code == "response_not_cancellable" and "completed" in caught.value.message
    assert (await client.responses.retrieve(queued.id)).status == "completed"
