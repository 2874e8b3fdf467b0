"""Deletes expired responses (with their items and prefix records) in bounded batches."""

from __future__ import annotations

import asyncio
import logging
import time

from service.store.retention import RetentionStore

log = logging.getLogger("convstate.retention")

# A pass stops after this many batches even if more rows expired; the next pass continues.
MAX_BATCHES_PER_PASS = 100


async def retention_pass(store: RetentionStore, batch: int) -> int:
    """Delete what has expired, one short transaction per batch; how many responses went."""
    now = time.time()
    deleted = 0
    for _ in range(MAX_BATCHES_PER_PASS):
        count = await store.purge(now, batch)
        deleted += count
        if count < batch:
            break
    return deleted


async def retain_forever(store: RetentionStore, interval: float, batch: int) -> None:
    """At start-up and then every `interval` seconds, until cancelled."""
    while True:
        try:
            deleted = await retention_pass(store, batch)
            if deleted:
                log.info("deleted %d expired responses", deleted)
        except Exception:
            log.exception("retention pass failed; retrying in %.0fs", interval)
        await asyncio.sleep(interval)
