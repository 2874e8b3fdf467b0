"""Token artifacts: packing, observed append-safety, the store on both dialects, the bounded queue and
the writer, and their retention."""

from __future__ import annotations

import asyncio
import time
import uuid
import zlib
from dataclasses import replace

import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from service import metrics
from service.domain.artifacts import (
    COMPRESSION_LEVEL,
    CONTRADICTED,
    AppendObservation,
    ParentClaim,
    StoredIds,
    TurnTokens,
    observe_append,
    observe_turn,
    pack,
    rebuild,
    unpack,
)
from service.domain.items import normalize_input
from service.domain.prefix import pack_tokens, token_digest
from service.store.artifacts import ArtifactStore
from service.store.db import StatementCounter
from service.store.models import PrefixRecord
from service.store.responses import ResponseStore, TurnWrite
from service.store.unit import unit_of_work
from service.workers.artifacts import INLINE_IDS, ArtifactQueue, ArtifactWriter
from service.workers.retention import retention_pass
from tests.factories import prefix_write, stored_response

FINGERPRINT = "ef" * 16  # prefix_write's


def turn_tokens(
    response_id: str, tenant: str, parent_id: str | None, prompt: list[int], output: list[int]
) -> TurnTokens:
    now = time.time()
    return TurnTokens(
        response_id=response_id,
        tenant=tenant,
        model="m",
        parent_id=parent_id,
        fingerprint=FINGERPRINT,
        template="tpl",
        decision="cache_ref; reason=hit" if parent_id else "full; reason=no_parent",
        relied_on_parent=parent_id is not None,
        prompt_ids=prompt,
        output_ids=output,
        created_at=now,
        expires_at=now + 60,
    )


def test_packing_round_trips_and_compresses_repetitive_ids() -> None:
    ids = [0, 1, 2**32 - 1, 151_643, *range(1000), *([42] * 5000)]
    blob = pack(ids)
    assert unpack(blob) == ids
    assert len(blob) < 4 * len(ids) / 2


@pytest.mark.parametrize("count", [0, 1, 127, 128, 129, 1024, 2048, 8191, 8192, 8193, 40_000])
def test_packing_fits_zlib_to_the_ids_and_reads_what_it_wrote_before(count: int) -> None:
    """Each size of window (one per power of two of the packed bytes) round-trips; it compresses about as
    well as zlib's defaults; and a blob packed with those defaults, as artifacts written before were, reads
    back the same."""
    ids = [(index * 7919) % 151_000 if index % 3 else 13 for index in range(count)]
    blob = pack(ids)
    assert unpack(blob) == ids
    default = zlib.compress(pack_tokens(ids), COMPRESSION_LEVEL)
    assert len(blob) <= len(default) * 1.1 + 8
    assert unpack(default) == ids


def test_append_safety_is_an_exact_prefix_of_prompt_then_output() -> None:
    parent = StoredIds(0, [1, 2], [3])
    assert observe_append(parent, 0, [1, 2, 3, 4, 5]) == AppendObservation(True, None)
    assert observe_append(parent, 0, [1, 2, 9, 4]) == AppendObservation(False, 2)
    assert observe_append(parent, 0, [1, 7]) == AppendObservation(False, 1)
    assert observe_append(parent, 0, [1, 2]) == AppendObservation(False, 2)  # ends inside the parent
    # Only what follows a continued turn's start is compared; its index counts from the prompt's start.
    assert observe_append(parent, 1, [2, 3, 4]) == AppendObservation(True, None)
    assert observe_append(parent, 2, [9, 4]) == AppendObservation(False, 2)
    assert observe_append(StoredIds(5, [1, 2], [3]), 6, [2, 8]) == AppendObservation(False, 7)
    # The parent's stored ids must reach back to the start.
    assert observe_append(StoredIds(5, [1, 2], [3]), 4, [1, 2, 3]) is None
    assert observe_append(parent, 3, [3, 4]) is None


def test_a_whole_prompt_is_rebuilt_from_its_chain() -> None:
    links = [(0, pack([1, 2, 3, 4])), (3, pack([4, 5, 6])), (5, pack([6, 7]))]
    assert rebuild(links) == [1, 2, 3, 4, 5, 6, 7]
    assert rebuild(links[1:]) is None  # no whole start
    assert rebuild([(0, pack([1])), (3, pack([4]))]) is None  # a start past the prompt


def test_a_contradiction_is_a_relied_on_claim_the_prompt_ids_disprove() -> None:
    # The parent's record claims the next prompt starts with [1, 2, 3]; this child's starts [1, 2, 9].
    child = turn_tokens("c", "t", "p", [1, 2, 9, 4], [])
    claim = ParentClaim(FINGERPRINT, True, 3, token_digest([1, 2, 3]), StoredIds(0, [1, 2], [3]))
    observed = observe_turn(child, claim)
    assert observed.observation == AppendObservation(False, 2)
    assert observed.diagnostic is not None
    assert observed.diagnostic["kind"] == CONTRADICTED
    assert observed.diagnostic["observed_prefix_hash"] == token_digest([1, 2, 9])
    assert observed.diagnostic["expected"] == [1, 2, 3] and observed.diagnostic["observed"] == [1, 2, 9, 4]
    assert observe_turn(child, replace(claim, claimed_safe=False)).diagnostic is None
    assert observe_turn(replace(child, relied_on_parent=False), claim).diagnostic is None
    assert observe_turn(replace(child, prompt_ids=[1, 2, 3, 4]), claim).diagnostic is None
    assert observe_turn(replace(child, prompt_ids=[1, 2]), claim).diagnostic is not None  # too short
    # Generated ids the template re-renders otherwise are not append-safe, but the claim (about the
    # re-rendered reply) holds: no contradiction.
    rerendered = ParentClaim(FINGERPRINT, True, 3, token_digest([1, 2, 8]), StoredIds(0, [1, 2], [3]))
    unsafe = observe_turn(replace(child, prompt_ids=[1, 2, 8, 4]), rerendered)
    assert unsafe.observation == AppendObservation(False, 2) and unsafe.diagnostic is None
    # The claim is checked even before the parent's own ids are stored.
    assert observe_turn(child, replace(claim, tokens=None)).diagnostic is not None
    assert observe_turn(child, replace(claim, tokens=None)).observation is None
    # Another (or an unknown) fingerprint renders another prompt by design: nothing to compare.
    assert observe_turn(child, replace(claim, fingerprint="00" * 16)) == observe_turn(child, None)
    assert (
        observe_turn(replace(child, fingerprint=None), replace(claim, fingerprint=None)).observation is None
    )


async def _stored_turns(
    engine: AsyncEngine, tenant: str, depth: int, claims: list[list[int]] | None = None
) -> list[str]:
    """A lineage of `depth` stored turns, each with a prefix record claiming a safe boundary: that the
    next prompt starts with its claim's ids."""
    store, ids, parent = ResponseStore(engine), [], None
    for level in range(depth):
        response = stored_response(tenant, previous_response_id=parent, depth=level)
        claim = claims[level] if claims else [level]
        record = replace(prefix_write("pc"), safe_tokens=len(claim), prefix_hash=token_digest(claim))
        async with unit_of_work(engine) as uow:
            await store.write_turn(
                uow, TurnWrite(response, time.time() + 60, normalize_input("hi"), [], record)
            )
        ids.append(response.id)
        parent = response.id
    return ids


async def _record_status(engine: AsyncEngine, response_id: str) -> tuple[str, str | None]:
    async with engine.connect() as conn:
        row = (
            await conn.execute(
                select(PrefixRecord.status, PrefixRecord.invalid_reason).where(
                    PrefixRecord.response_id == response_id
                )
            )
        ).one()
    return row[0], row[1]


async def test_the_writer_stores_batches_observes_parents_and_invalidates_contradicted_records(
    engine: AsyncEngine,
) -> None:
    tenant = uuid.uuid4().hex
    # Each record claims its prompt and output ids start the next prompt.
    claims = [[1, 2, 3, 4, 5], [1, 2, 3, 4, 5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9], [0]]
    a, b, c, d = await _stored_turns(engine, tenant, 4, claims)
    store = ArtifactStore(engine)
    writer = ArtifactWriter(ArtifactQueue(10), store, batch=10)
    # a alone first; then b (parent in the table), c (parent in the same batch, append-safe) and d
    # (diverges from c's ids, which c's record claimed it would start with).
    assert await writer.write([turn_tokens(a, tenant, None, [1, 2, 3], [4, 5])]) == 1
    assert (
        await writer.write(
            [
                turn_tokens(b, tenant, a, [1, 2, 3, 4, 5, 6], [7]),
                turn_tokens(c, tenant, b, [1, 2, 3, 4, 5, 6, 7, 8], [9]),
                turn_tokens(d, tenant, c, [1, 2, 3, 4, 5, 6, 7, 0, 9], [10]),
            ]
        )
        == 3
    )
    first = await store.get(a)
    assert first is not None and unpack(first.prompt_ids) == [1, 2, 3] and unpack(first.output_ids) == [4, 5]
    assert (first.prompt_count, first.output_count, first.append_safe) == (3, 2, None)
    second, third, fourth = [await store.get(x, tenant) for x in (b, c, d)]
    assert second is not None and (second.append_safe, second.divergence) == (True, None)
    assert third is not None and (third.append_safe, third.divergence) == (True, None)
    assert fourth is not None and (fourth.append_safe, fourth.divergence) == (False, 7)
    assert fourth.diagnostic is not None and fourth.diagnostic["parent_id"] == c
    assert await store.get(d, "another tenant") is None
    chain = await store.chain(a, tenant)
    assert chain is not None and chain.fingerprint == FINGERPRINT and unpack(chain.output_ids) == [4, 5]
    assert rebuild(chain.links) == [1, 2, 3]
    assert await store.chain(a, "another tenant") is None
    assert await _record_status(engine, c) == ("invalidated", CONTRADICTED)
    assert await _record_status(engine, b) == ("valid", None)
    [counts] = [row for row in await store.append_safety("m") if row.template == "tpl"]
    assert (counts.observed, counts.safe, counts.contradicted) >= (3, 2, 1)


async def test_a_turn_stores_only_what_it_added_and_its_whole_prompt_is_rebuilt_from_the_chain(
    engine: AsyncEngine,
) -> None:
    """After a ref the backend reports the prompt's ids from `prompt_start` on, and that is what is stored
    and compared with the parent's ids. A whole prompt (a full render) after such a turn is compared with
    the parent's whole prompt, rebuilt from the batch or from the table; reseed and the admin view rebuild
    it the same way, and a chain whose artifact is missing rebuilds nothing."""
    tenant = uuid.uuid4().hex
    a, b, c, d, e, f, orphan_parent = await _stored_turns(engine, tenant, 7, [[1]] * 7)
    [orphan] = await _stored_turns(engine, tenant, 1)
    store = ArtifactStore(engine)
    writer = ArtifactWriter(ArtifactQueue(10), store, batch=10)
    await writer.write([turn_tokens(a, tenant, None, [1, 2, 3], [4])])
    await writer.write(
        [
            replace(turn_tokens(b, tenant, a, [4, 5], [6]), prompt_start=3),
            replace(turn_tokens(c, tenant, b, [6, 7], [8]), prompt_start=5),
            turn_tokens(d, tenant, c, [1, 2, 3, 4, 5, 6, 7, 8, 9], [10]),  # its parent from the batch
            replace(turn_tokens(orphan, tenant, orphan_parent, [8, 9], [1]), prompt_start=7),
        ]
    )
    await writer.write([replace(turn_tokens(e, tenant, d, [10, 11], [12]), prompt_start=9)])
    # Its parent's whole prompt from the table: e's end, in front of it d's start.
    await writer.write([turn_tokens(f, tenant, e, [*range(1, 13), 13], [14])])
    stored = {}
    for x in (b, c, d, e, f, orphan):
        artifact = await store.get(x, tenant)
        assert artifact is not None
        stored[x] = artifact
    assert unpack(stored[b].prompt_ids) == [4, 5]
    assert (stored[b].prompt_start, stored[b].prompt_count) == (3, 5)
    assert [stored[x].append_safe for x in (b, c, d, e, f)] == [True] * 5
    assert stored[orphan].append_safe is None
    wholes = {}
    for x in (c, e, f, orphan):
        chain = await store.chain(x, tenant)
        assert chain is not None
        wholes[x] = rebuild(chain.links)
    assert wholes[c] == [1, 2, 3, 4, 5, 6, 7]
    assert wholes[e] == list(range(1, 12)) and wholes[f] == list(range(1, 14))
    assert wholes[orphan] is None
    assert await store.chain(c, "another tenant") is None


async def test_a_batch_is_two_statements_on_postgres_whatever_its_size(pg_engine: AsyncEngine) -> None:
    """One statement reads a batch's parents and one writes it (its artifacts and the records it
    contradicted): two round trips, no BEGIN or COMMIT. And the same two prepared statements whatever the
    batch's size (`= ANY($1)`): an IN list of each length would be another statement, pushing a turn's own
    statements out of the connection's statement cache, so that turns prepared them again."""
    tenant = uuid.uuid4().hex
    turns = await _stored_turns(pg_engine, tenant, 10, [[1]] * 10)
    writer = ArtifactWriter(ArtifactQueue(10), ArtifactStore(pg_engine), batch=10)
    counter = StatementCounter()
    try:
        # The first batch prepares both statements on the pool's connection.
        await writer.write([turn_tokens(turns[1], tenant, turns[0], [1, 2], [3])])
        costs = []
        # The last batch's ids contradict the first turn's claim (that the next prompt starts [1]).
        for batch, prompt in ((turns[2:4], [1, 2]), (turns[4:7], [1, 2]), (turns[7:10], [9, 2])):
            counter.reset()
            rows = [turn_tokens(x, tenant, turns[0], prompt, [3]) for x in batch]
            assert await writer.write(rows) == len(batch)
            costs.append((counter.count, counter.round_trips))
    finally:
        counter.close()
    assert costs == [(2, 2)] * 3
    assert await _record_status(pg_engine, turns[0]) == ("invalidated", CONTRADICTED)


async def test_a_batch_of_many_ids_is_packed_in_a_worker_thread_and_stored_alike(engine: AsyncEngine) -> None:
    tenant = uuid.uuid4().hex
    a, b = await _stored_turns(engine, tenant, 2)
    prompt = list(range(INLINE_IDS))
    store = ArtifactStore(engine)
    batch = [turn_tokens(a, tenant, None, prompt, [7]), turn_tokens(b, tenant, a, [*prompt, 7, 8], [9])]
    assert await ArtifactWriter(ArtifactQueue(10), store, batch=10).write(batch) == 2
    stored = await store.get(b, tenant)
    assert stored is not None and unpack(stored.prompt_ids) == [*prompt, 7, 8]
    assert (stored.prompt_count, stored.append_safe) == (INLINE_IDS + 2, True)


async def test_an_artifact_of_a_response_deleted_meanwhile_is_skipped(engine: AsyncEngine) -> None:
    tenant = uuid.uuid4().hex
    [kept] = await _stored_turns(engine, tenant, 1)
    store = ArtifactStore(engine)
    rows = [
        turn_tokens(kept, tenant, None, [1], [2]),
        turn_tokens("resp_gone" + tenant, tenant, None, [1], [2]),
    ]
    assert await ArtifactWriter(ArtifactQueue(10), store, batch=10).write(rows) == 1


async def test_a_full_queue_drops_and_counts_without_waiting() -> None:
    queue = ArtifactQueue(2)
    dropped = metrics.artifact_drops.labels("queue_full")
    before = dropped._value.get()
    results = [queue.offer(turn_tokens(f"r{i}", "t", None, [i], [])) for i in range(5)]
    assert results == [True, True, False, False, False]
    assert dropped._value.get() == before + 3
    assert [turn.response_id for turn in await asyncio.wait_for(queue.take(10), 1)] == ["r0", "r1"]


async def test_a_batch_gathers_for_a_while_after_its_first_turn() -> None:
    """Sequential turns come one at a time: without the linger each would be a transaction of its own."""
    queue = ArtifactQueue(10)
    queue.offer(turn_tokens("r0", "t", None, [0], []))
    taking = asyncio.create_task(queue.take(10, linger=0.3))
    await asyncio.sleep(0.05)
    queue.offer(turn_tokens("r1", "t", None, [1], []))
    assert [turn.response_id for turn in await asyncio.wait_for(taking, 5)] == ["r0", "r1"]


async def test_expired_artifacts_go_in_bounded_batches(engine: AsyncEngine) -> None:
    tenant = uuid.uuid4().hex
    turns = await _stored_turns(engine, tenant, 3)
    store = ArtifactStore(engine)
    # Purging is not per tenant: expired artifacts other tests left in this database go first, so that
    # the counts below are this test's alone.
    while await store.purge(time.time(), 1000):
        pass
    now = time.time()
    rows = [replace(turn_tokens(x, tenant, None, [1], [2]), expires_at=now - 1) for x in turns[:2]]
    await ArtifactWriter(ArtifactQueue(10), store, batch=10).write(
        [*rows, turn_tokens(turns[2], tenant, None, [1], [2])]
    )
    assert await store.purge(now, 1) == 1
    assert await retention_pass(store.purge, batch=1) == 1
    assert [await store.get(x) is None for x in turns] == [True, True, False]
