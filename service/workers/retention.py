"""Deletes expired rows in bounded batches: responses (with their items and prefix records), token
artifacts, which expire sooner, and the stream events of background responses."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from service.store.artifacts import ArtifactStore
from service.store.events import EventStore
from service.store.retention import RetentionStore

log = logging.getLogger("convstate.retention")

# A pass stops after this many batches even if more rows expired; the next pass continues.
MAX_BATCHES_PER_PASS = 100

# A store's purge: delete up to `batch` rows expired at `now`, return how many went.
Purge = Callable[[float, int], Awaitable[int]]


async def retention_pass(purge: Purge, batch: int) -> int:
    """Delete what has expired, one short transaction per batch; how many rows went."""
    now = time.time()
    deleted = 0
    for _ in range(MAX_BATCHES_PER_PASS):
        count = await purge(now, batch)
        deleted += count
        if count < batch:
            break
    return deleted


async def retain_forever(
    responses: RetentionStore, artifacts: ArtifactStore, events: EventStore, interval: float, batch: int
) -> None:
    """At start-up and then every `interval` seconds, until cancelled."""
    while True:
        purges = (
            ("responses", responses.purge),
            ("token artifacts", artifacts.purge),
            ("stream events", events.purge),
        )
        for what, purge in purges:
            try:
                deleted = await retention_pass(purge, batch)
                if deleted:
                    log.info("deleted %d expired %s", deleted, what)
            except Exception:
                log.exception("retention pass over %s failed; retrying in %.0fs", what, interval)
        await asyncio.sleep(interval)
