"""Follows the invalidation feed so every decision can consult it without SQL.

Each replica keeps the whole feed in an in-memory index. On Postgres a NOTIFY sent with each new row wakes
the watcher at once; on every database it also polls every quarter of the max lag, so a lost notification
or a dropped connection is caught. A view that has not been refreshed within the max lag is not trusted:
every parent then counts as invalidated (the turn goes full) and API keys are looked up again, until the
watcher catches up. So an invalidation is honoured by every replica within the max lag, whatever fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable

from sqlalchemy.ext.asyncio import AsyncEngine

from service.domain.invalidation import InvalidationIndex, Scope, Subject
from service.store.db import autocommit
from service.store.invalidations import StoredInvalidation, listen, read_after
from service.store.responses import ParentTurn

log = logging.getLogger("convstate.invalidations")

# Beyond the max lag, how much later a record may be stamped than the invalidation it missed: the commit
# of the invalidation row, and clock differences between replicas (keep them NTP-synchronized).
CLOCK_MARGIN = 1.0


class InvalidationWatcher:
    def __init__(
        self,
        engine: AsyncEngine,
        max_lag: float,
        *,
        on_tenant_config: Callable[[str], None],
        on_api_key: Callable[[str], None],
    ) -> None:
        """`engine` is the watcher's own (one connection), so a busy pool never delays the feed."""
        self._engine = autocommit(engine)
        self.max_lag = max_lag
        self.index = InvalidationIndex(window=max_lag + CLOCK_MARGIN)
        self._on_tenant_config = on_tenant_config
        self._on_api_key = on_api_key
        self._last_id = 0
        self._synced_at = -math.inf
        self._wake = asyncio.Event()

    def fresh(self) -> bool:
        return time.time() - self._synced_at <= self.max_lag

    def invalidated_since(self, tenant: str, parent: ParentTurn | None) -> float | None:
        """The decision's `invalidated_since` for a turn continuing `parent`."""
        if parent is None or parent.prefix is None:
            return None
        response = parent.response
        return self.cutoff(
            Subject(
                tenant=tenant,
                model=response.model,
                conversation_id=response.conversation_id,
                lineage_root=response.lineage_root,
                depth=response.depth,
                fingerprint_parts=parent.prefix.fingerprint_parts,
            )
        )

    def cutoff(self, subject: Subject) -> float | None:
        """The index's cutoff for the subject; every record is stale while the view is not fresh."""
        return self.index.cutoff(subject) if self.fresh() else math.inf

    def made_here(self, row: StoredInvalidation) -> None:
        """This replica wrote the row: honour it now, not at the next read of the feed (which still reads
        it, and every row before it, in order; adding a rule twice changes nothing)."""
        self.index.add(row.rule)

    def _apply(self, rows: list[StoredInvalidation]) -> None:
        for row in rows:
            rule = row.rule
            if rule.scope is Scope.TENANT_CONFIG and rule.key is not None:
                self._on_tenant_config(rule.key)
            elif rule.scope is Scope.API_KEY and rule.key is not None:
                self._on_api_key(rule.key)
            else:
                self.index.add(rule)
            self._last_id = max(self._last_id, row.id)

    async def sync(self) -> None:
        """Read the feed once, at start-up, so the first requests find the view fresh. A database that
        cannot be reached does not stop the start: the view stays stale (turns go full, keys are looked
        up, and those lookups answer 503) until `run` reads the feed."""
        try:
            async with self._engine.connect() as conn:
                started = time.time()
                self._apply(await read_after(conn, self._last_id))
                self._synced_at = started
        except Exception:
            log.exception("invalidation feed unreadable at start-up")

    async def run(self) -> None:
        """Until cancelled: listen where the database can notify, poll always; reconnect after errors."""
        poll = self.max_lag / 4
        while True:
            try:
                async with self._engine.connect() as conn:
                    await listen(conn, self._wake.set)
                    while True:
                        self._wake.clear()
                        started = time.time()
                        self._apply(await read_after(conn, self._last_id))
                        self._synced_at = started
                        # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancel
                        # that lands as its timeout fires, and the watcher would then never stop.
                        with contextlib.suppress(TimeoutError):
                            async with asyncio.timeout(poll):
                                await self._wake.wait()
            except Exception:
                log.exception("invalidation feed unreadable; decisions go full until it is back")
                await asyncio.sleep(poll)
