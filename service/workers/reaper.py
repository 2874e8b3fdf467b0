"""Fails background responses left queued or in progress by a process that died (its lease ran out)."""

from __future__ import annotations

import asyncio
import logging
import time

from service.store.responses import ResponseStore

log = logging.getLogger("convstate.reaper")


async def reap_forever(responses: ResponseStore, interval: float) -> None:
    """At start-up and then every `interval` seconds, until cancelled."""
    while True:
        try:
            reaped = await responses.reap(time.time())
            if reaped:
                log.warning("finalized %d abandoned responses as failed", reaped)
        except Exception:
            log.exception("reaper pass failed; retrying in %.0fs", interval)
        await asyncio.sleep(interval)
