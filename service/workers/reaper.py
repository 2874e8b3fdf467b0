"""Finalizes turns a dead process left: queued or running responses whose lease ran out become `failed`,
and the conversations they still locked are freed, in one transaction per pass."""

from __future__ import annotations

import asyncio
import logging
import time

from service.store.conversations import ConversationStore
from service.store.responses import Reaped, ResponseStore
from service.store.unit import unit_of_work

log = logging.getLogger("convstate.reaper")


async def reap_once(responses: ResponseStore, conversations: ConversationStore) -> list[Reaped]:
    """One pass; returns the responses it actually failed."""
    async with unit_of_work(responses.engine) as uow:
        reaped = await responses.reap(uow, time.time())
        conversation_ids = [entry.conversation_id for entry in reaped if entry.conversation_id is not None]
        response_ids = [entry.id for entry in reaped if entry.conversation_id is not None]
        await conversations.release_reaped(uow, conversation_ids, response_ids)
    return reaped


async def reap_forever(responses: ResponseStore, conversations: ConversationStore, interval: float) -> None:
    """At start-up and then every `interval` seconds, until cancelled."""
    while True:
        try:
            reaped = await reap_once(responses, conversations)
            if reaped:
                log.warning(
                    "finalized %d abandoned responses as failed: %s",
                    len(reaped),
                    ", ".join(entry.id for entry in reaped[:20]),
                )
        except Exception:
            log.exception("reaper pass failed; retrying in %.0fs", interval)
        await asyncio.sleep(interval)
