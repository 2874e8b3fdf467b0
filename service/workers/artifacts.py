"""The artifact writer: committed turns' token ids into `token_artifacts`, off the request path.

The pipeline offers each committed turn's ids to a bounded in-process queue and moves on: when the queue
is full the artifact is dropped and counted, never waited for. One writer task takes what is queued in
batches; per batch it reads the parents' records and artifacts (one query), compares and packs in a
worker thread (ids of long prompts are large: the event loop never packs them), and stores the batch in
one transaction that also invalidates the parent records the observations contradict.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from service import metrics
from service.domain.artifacts import (
    ParentClaim,
    StoredIds,
    TurnTokens,
    artifact_row,
    observe_turn,
    rebuild,
    unpack,
)
from service.store.artifacts import ArtifactStore, ParentRow

log = logging.getLogger("convstate.artifacts")


class ArtifactQueue:
    """Bounded; `offer` never blocks."""

    def __init__(self, capacity: int) -> None:
        self._queue: asyncio.Queue[TurnTokens] = asyncio.Queue(capacity)

    def offer(self, turn: TurnTokens) -> bool:
        try:
            self._queue.put_nowait(turn)
        except asyncio.QueueFull:
            metrics.artifact_drops.labels("queue_full").inc()
            return False
        metrics.artifact_queue_depth.set(self._queue.qsize())
        return True

    async def take(self, limit: int, linger: float = 0.0) -> list[TurnTokens]:
        """Wait for one turn, then `linger` seconds for more, and take what is queued, up to `limit` in
        all."""
        batch = [await self._queue.get()]
        if linger > 0:
            await asyncio.sleep(linger)
        while len(batch) < limit and not self._queue.empty():
            batch.append(self._queue.get_nowait())
        metrics.artifact_queue_depth.set(self._queue.qsize())
        return batch

    def take_all(self) -> list[TurnTokens]:
        batch = []
        while not self._queue.empty():
            batch.append(self._queue.get_nowait())
        metrics.artifact_queue_depth.set(0)
        return batch


def _walks(batch: Sequence[TurnTokens], parents: Mapping[str, ParentRow]) -> set[str]:
    """The stored turns whose whole prompt must be rebuilt from the table for this batch: a whole prompt
    (a full render) is compared with its parent's whole prompt, and where that parent, or its nearest
    ancestor outside the batch, continued a handle, only its end is stored."""
    by_id = {turn.response_id: turn for turn in batch}
    walks = set()
    for turn in batch:
        ancestor = turn.parent_id if not turn.prompt_start else None
        while ancestor in by_id and by_id[ancestor].prompt_start:
            ancestor = by_id[ancestor].parent_id
        if ancestor is None or ancestor in by_id:
            continue
        row = parents.get(ancestor)
        if row is not None and row.prompt_ids is not None and row.prompt_start:
            walks.add(ancestor)
    return walks


def _build(
    batch: Sequence[TurnTokens], parents: Mapping[str, ParentRow], walked: Mapping[str, Sequence[int] | None]
) -> tuple[list[Mapping[str, Any]], dict[str, str]]:
    """Rows for the batch and the contradicted parent records (id -> model). A parent written in the same
    batch is taken from the batch itself; `walked` has the whole prompts `_walks` asked for."""
    in_batch: dict[str, TurnTokens] = {}

    def stored(response_id: str) -> StoredIds | None:
        earlier = in_batch.get(response_id)
        if earlier is not None:
            return StoredIds(earlier.prompt_start, earlier.prompt_ids, earlier.output_ids)
        row = parents.get(response_id)
        if row is None or row.prompt_ids is None or row.output_ids is None:
            return None
        return StoredIds(row.prompt_start or 0, unpack(row.prompt_ids), unpack(row.output_ids))

    @functools.cache
    def whole(response_id: str) -> Sequence[int] | None:
        ids = stored(response_id)
        if ids is None or not ids.prompt_start:
            return ids.prompt if ids else None
        earlier = in_batch.get(response_id)
        if earlier is None:
            return walked.get(response_id)
        before = whole(earlier.parent_id) if earlier.parent_id else None
        if before is None or len(before) < ids.prompt_start:
            return None
        return [*before[: ids.prompt_start], *ids.prompt]

    rows, contradicted = [], {}
    for turn in batch:
        claim = None
        record = parents.get(turn.parent_id) if turn.parent_id else None
        if record is not None and turn.parent_id is not None:
            tokens = stored(turn.parent_id)
            if tokens is not None and tokens.prompt_start and not turn.prompt_start:
                prompt = whole(turn.parent_id)
                tokens = StoredIds(0, prompt, tokens.output) if prompt is not None else None
            claim = ParentClaim(
                record.fingerprint, record.claimed_safe, record.safe_tokens, record.prefix_hash, tokens
            )
        in_batch[turn.response_id] = turn
        observed = observe_turn(turn, claim)
        rows.append(artifact_row(turn, observed))
        if observed.observation is not None:
            result = "safe" if observed.observation.append_safe else "unsafe"
            metrics.append_safety.labels(turn.model, turn.template or "unknown", result).inc()
        if observed.diagnostic is not None and turn.parent_id is not None:
            contradicted[turn.parent_id] = turn.model
    return rows, contradicted


# How long the writer lets a batch gather after its first turn. A transaction per turn cost as much
# service CPU as the turn's own statements (sequential turns came one per batch); an artifact is stored
# at most this much later, and a turn's parent is then mostly in the same batch.
LINGER_SECONDS = 0.25


# Below this many ids a batch is compared and packed on the event loop. A hop to a worker thread costs
# 35-55 µs of CPU, as much as one turn's packing and comparison (70 µs for a cache_ref turn of 200 ids,
# two zlib calls most of it), and a thread keeps little off the loop anyway: pure Python holds the GIL.
# From here on (5 such turns, about 0.35 ms; a long prompt costs 0.1 ms per 1,000 ids) the work goes to a
# thread, where zlib runs without the GIL. Rebuilding a whole prompt always does: it is rare (a full
# render after a turn that continued a handle) and grows with the conversation (0.5 ms for 26 links).
INLINE_IDS = 1_000


class ArtifactWriter:
    def __init__(
        self, queue: ArtifactQueue, store: ArtifactStore, batch: int, linger: float = LINGER_SECONDS
    ) -> None:
        self.queue = queue
        self.store = store
        self.batch = batch
        self.linger = linger

    async def write(self, batch: Sequence[TurnTokens]) -> int:
        """Store one batch; how many artifacts were written."""
        parent_ids = {turn.parent_id for turn in batch if turn.parent_id is not None}
        parents = await self.store.parents(parent_ids)
        walked = {}
        for response_id in _walks(batch, parents):
            chain = await self.store.chain(response_id)
            walked[response_id] = await asyncio.to_thread(rebuild, chain.links) if chain else None
        ids = sum(len(turn.prompt_ids) + len(turn.output_ids) for turn in batch)
        if ids < INLINE_IDS:
            rows, contradicted = _build(batch, parents, walked)
        else:
            rows, contradicted = await asyncio.to_thread(_build, batch, parents, walked)
        written = await self.store.write(rows, contradicted.keys())
        metrics.artifacts_written.inc(written)
        for parent_id, model in contradicted.items():
            metrics.append_safety_contradictions.labels(model).inc()
            log.error("observed ids contradict %s's safe boundary; its record is invalidated", parent_id)
        return written

    async def _write_logged(self, batch: Sequence[TurnTokens]) -> None:
        try:
            await self.write(batch)
        except Exception:
            metrics.artifact_drops.labels("write_failed").inc(len(batch))
            log.exception("could not store %d token artifacts", len(batch))

    async def run(self) -> None:
        """Until cancelled: write what is queued, a batch at a time."""
        while True:
            await self._write_logged(await self.queue.take(self.batch, self.linger))

    async def flush(self) -> None:
        """Write what is still queued (at shutdown, after the last turn)."""
        left = self.queue.take_all()
        for start in range(0, len(left), self.batch):
            await self._write_logged(left[start : start + self.batch])
