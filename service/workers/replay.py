"""Keeps the replay cache within its bounds: expired entries go, then the oldest beyond the count or the
byte bound."""

from __future__ import annotations

import asyncio
import logging
import time

from service import metrics
from service.store.replay import ReplayStore

log = logging.getLogger("convstate.replay")


async def purge_pass(store: ReplayStore, max_entries: int, max_bytes: int) -> tuple[int, int]:
    expired, evicted = await store.purge(time.time(), max_entries, max_bytes)
    metrics.replay_removed.labels("expired").inc(expired)
    metrics.replay_removed.labels("evicted").inc(evicted)
    return expired, evicted


async def purge_forever(store: ReplayStore, interval: float, max_entries: int, max_bytes: int) -> None:
    """At start-up and then every `interval` seconds, until cancelled."""
    while True:
        try:
            expired, evicted = await purge_pass(store, max_entries, max_bytes)
            if expired or evicted:
                log.info("replay cache: %d expired and %d evicted entries removed", expired, evicted)
        except Exception:
            log.exception("replay-cache purge failed; retrying in %.0fs", interval)
        await asyncio.sleep(interval)
