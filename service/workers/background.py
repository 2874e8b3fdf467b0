"""Background mode: a turn stored as `queued` and answered at once, then run in a task of this process.

The runner takes the queued row to `in_progress` (unless it was cancelled first), answers the turn like a
foreground one while the heartbeat renews its lease and notices a cancel made on any replica, and records
a failure as `failed`. A turn still running when the process shuts down past its grace period is failed
with a message that says so (there is no hand-over of a half-run turn to another replica); one whose
process died is failed by the reaper once its lease runs out.

A background turn created with `stream: true` streams to the client that created it and records its
events (service/store/events.py) as it emits them, in batches, with their sequence numbers. `follow`
replays them for GET /v1/responses/{id}?stream=true on any replica, then polls for new ones until the
terminal event; a response that finished without one (its process died, the reaper failed it) gets one
made from the stored response.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from service.domain.output import TERMINAL_EVENTS, terminal_event_type
from service.errors import LeaseLost
from service.store.events import EventStore

if TYPE_CHECKING:
    from service.pipeline import Pipeline, PreparedTurn, TurnStream
    from service.store.responses import StoredResponse

log = logging.getLogger("convstate.background")

Event = dict[str, Any]

# Events read per query when replaying.
REPLAY_BATCH = 500
# While no event comes, a follower rereads the response's status this often...
STATUS_CHECK_SECONDS = 1.0
# ...and takes a finished response whose terminal event is still missing this long after it saw it
# finished to have lost its producer (a live producer records it right after the row's final UPDATE).
TERMINAL_GRACE_SECONDS = 2.0


class BackgroundRunner:
    def __init__(self, turns: Pipeline, events: EventStore) -> None:
        self.turns = turns
        self.events = events

    def submit(self, turn: PreparedTurn) -> None:
        """Run a turn whose row is stored as queued."""
        self.turns.tasks.spawn(self._run(turn))

    async def _run(self, turn: PreparedTurn) -> None:
        turns = self.turns
        try:
            if not await self._start(turn):
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

    async def _start(self, turn: PreparedTurn) -> bool:
        """queued -> in_progress with a fresh lease; False if it was cancelled first."""
        lease = time.time() + self.turns.settings.turn_lease_seconds
        return await self.turns.responses.start(turn.tenant, turn.response_id, lease)

    # --- streamed background turns ------------------------------------------------------------------

    def recorder(self, turn: PreparedTurn) -> EventRecorder:
        """Where a streamed background turn's events are recorded."""
        settings = self.turns.settings
        return EventRecorder(
            self.events,
            turn.tenant,
            turn.response_id,
            self.turns.expires_at(turn),
            settings.stream_events_max,
        )

    async def submit_streamed(self, turn: PreparedTurn, stream: TurnStream, recorder: EventRecorder) -> None:
        """Run a turn whose row is stored as queued, its events going to `stream` and `recorder`. Its
        first events are recorded before its id leaves the service, so a GET ?stream=true on any replica
        finds them at once."""
        await recorder.flush()
        self.turns.tasks.spawn(self._run_streamed(turn, stream, recorder))

    async def _run_streamed(self, turn: PreparedTurn, stream: TurnStream, recorder: EventRecorder) -> None:
        recording = asyncio.ensure_future(recorder.run())
        try:
            if await self._start(turn):
                await self.turns.answer_streamed(turn, stream)
                return
            await self.turns.release(turn)
            cancelled = await self.turns.cancelled(turn)
            if cancelled is not None:
                stream.emit({"type": terminal_event_type(cancelled.status), "response": cancelled})
        finally:
            stream.end()
            await recording

    async def follow(self, tenant: str, response_id: str, after: int) -> AsyncIterator[Event]:
        """The recorded events after sequence number `after`, then the new ones as they are recorded,
        until the terminal event. Ends without one if the response goes away (deleted or expired)."""
        cursor, next_check, finished_seen = after, 0.0, None
        while True:
            events = await self.events.after(tenant, response_id, cursor, REPLAY_BATCH)
            for event in events:
                yield event
                if event["type"] in TERMINAL_EVENTS:
                    return
            if events:
                cursor = events[-1]["sequence_number"]
                if len(events) == REPLAY_BATCH:
                    continue
            elif (now := time.monotonic()) >= next_check:
                next_check = now + STATUS_CHECK_SECONDS
                stored = await self.turns.responses.get(tenant, response_id)
                if stored is None:
                    return
                if stored.status not in ("queued", "in_progress"):
                    last = await self.events.last(tenant, response_id)
                    if last is not None and last.type in TERMINAL_EVENTS:
                        if last.sequence_number <= cursor:
                            return  # asked for what follows the end
                        continue  # recorded since the read above
                    if finished_seen is None:
                        finished_seen = now
                    elif now - finished_seen >= TERMINAL_GRACE_SECONDS:
                        log.info("stream of %s ends without its producer", response_id)
                        sequence = max(cursor, last.sequence_number if last else -1) + 1
                        yield _terminal(stored, sequence)
                        return
            await asyncio.sleep(self.turns.settings.stream_poll_interval)


class EventRecorder:
    """Writes a streamed background turn's events to the event table as they are emitted, one INSERT
    per batch of what was emitted while the previous one ran. It keeps at most `limit` events, then only
    the terminal one, so a replay always ends. A batch the database refuses is lost (and logged): a
    replay misses those events, and one that misses the terminal event gets it made from the stored
    response."""

    def __init__(
        self, store: EventStore, tenant: str, response_id: str, expires_at: float, limit: int
    ) -> None:
        self.store = store
        self.tenant = tenant
        self.response_id = response_id
        self.expires_at = expires_at
        self.limit = limit
        self._pending: list[Event] = []
        self._kept = 0
        self._closed = False
        self._wake = asyncio.Event()

    def add(self, event: Event) -> None:
        if self._kept < self.limit - 1 or event["type"] in TERMINAL_EVENTS:
            self._pending.append(event)
            self._kept += 1
            self._wake.set()

    def close(self) -> None:
        self._closed = True
        self._wake.set()

    async def flush(self) -> None:
        batch, self._pending = self._pending, []
        if batch:
            await self.store.append(self.tenant, self.response_id, self.expires_at, batch, time.time())

    async def run(self) -> None:
        """Beside the turn, until it is closed and everything it was given is written."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self.flush()
            except Exception:
                log.warning("lost stream events of %s", self.response_id, exc_info=True)
            if self._closed and not self._pending:
                return


def _terminal(response: StoredResponse, sequence_number: int) -> Event:
    return {
        "type": terminal_event_type(response.status),
        "response": response,
        "sequence_number": sequence_number,
    }
