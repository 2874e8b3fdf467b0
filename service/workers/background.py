"""Background mode: a turn stored as `queued` and answered at once, then run in a task of this process.

The runner takes the queued row to `in_progress` (unless it was cancelled first), answers the turn like a
foreground one while the heartbeat renews its lease and notices a cancel made on any replica, and records
a failure as `failed`. A turn still running when the process shuts down past its grace period is failed
with a message that says so (there is no hand-over of a half-run turn to another replica); one whose
process died is failed by the reaper once its lease runs out.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from service.errors import LeaseLost

if TYPE_CHECKING:
    from service.pipeline import Pipeline, PreparedTurn

log = logging.getLogger("convstate.background")


class BackgroundRunner:
    def __init__(self, turns: Pipeline) -> None:
        self.turns = turns

    def submit(self, turn: PreparedTurn) -> None:
        """Run a turn whose row is stored as queued."""
        self.turns.tasks.spawn(self._run(turn))

    async def _run(self, turn: PreparedTurn) -> None:
        turns = self.turns
        try:
            lease = time.time() + turns.settings.turn_lease_seconds
            if not await turns.responses.start(turn.tenant, turn.response_id, lease):
                await turns.release(turn)  # cancelled while queued
                return
            await turns.answer(turn)
        except LeaseLost:
            # Cancelled (from any replica) or reaped: the row already says so.
            log.info("background response %s stopped: no longer running", turn.response_id)
            await turns.release(turn)
        except BaseException as exc:
            await turns.fail(turn, exc, [])
            if not isinstance(exc, Exception):
                raise
