"""The tasks a process runs beside its requests (streamed and background turns, canaries), so that a
shutdown can let them finish within a grace period and then cancel what is left."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from typing import Any

log = logging.getLogger("convstate.tasks")

# After the grace period, how long cancelled turns get to record that they failed.
CANCEL_WAIT_SECONDS = 5.0


class TaskSet:
    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()
        # Set when a drain starts; the tasks it cancels can tell a shutdown from other cancellations.
        self.closing = False

    def spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._finished)

    @contextmanager
    def tracking(self) -> Iterator[None]:
        """Count the current task (a request's own) among ours while the block runs."""
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            yield
        finally:
            self._tasks.discard(task)

    def _finished(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task failed", exc_info=task.exception())

    async def drain(self, grace: float) -> None:
        """Wait up to `grace` seconds for every task, including those started meanwhile; then cancel the
        rest and give them a bounded time to clean up."""
        self.closing = True
        deadline = time.monotonic() + grace
        while self._tasks and (left := deadline - time.monotonic()) > 0:
            await asyncio.wait(set(self._tasks), timeout=left)
        if not self._tasks:
            return
        log.warning("cancelling %d tasks still running after the %.0fs grace period", len(self._tasks), grace)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.wait(set(self._tasks), timeout=CANCEL_WAIT_SECONDS)
