"""The replay cache's rows on Postgres and SQLite: one claimant wins however many race, a lapsed or given-up
claim is taken over, a lost claim cannot fill, refresh never steals a live claim, a new fingerprint
removes the model's other entries, the purge honours TTL and the size bounds (oldest first), and the
management queries select by tenant, model, key prefix and age; export and import round-trip."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from service.store.db import StatementCounter, create_engine, dispose
from service.store.migrate import upgrade
from service.store.replay import READY, Claim, Entry, ReplayStore, Selection
from service.store.tenants import TenantStore

LEASE = 10.0
TTL = 3600.0


def new_claim(
    tenant: str, key: str | None = None, *, model: str = "m", fingerprint: str | None = "fp"
) -> Claim:
    return Claim(
        tenant=tenant,
        key=key or uuid.uuid4().hex * 2,
        endpoint="chat.completions",
        model=model,
        fingerprint=fingerprint,
        request={"model": model},
        owner=uuid.uuid4().hex,
    )


def tenant() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


async def ready(store: ReplayStore, claim: Claim, now: float | None = None, reply: str = "answer") -> None:
    now = time.time() if now is None else now
    assert await store.claim(claim, now, LEASE)
    assert await store.fill(claim.tenant, claim.key, claim.owner, {"text": reply}, 10, now, TTL)


async def test_one_claimant_wins_a_race(engine: AsyncEngine) -> None:
    store = ReplayStore(engine)
    first = new_claim(tenant())
    rivals = [new_claim(first.tenant, first.key) for _ in range(8)]
    won = await asyncio.gather(*(store.claim(claim, time.time(), LEASE) for claim in rivals))
    assert sum(won) == 1
    found = await store.find(first.tenant, first.key)
    assert found is not None and found.status == "pending" and found.result is None


async def test_fill_makes_the_entry_ready_and_only_the_owner_fills(engine: AsyncEngine) -> None:
    store = ReplayStore(engine)
    claim = new_claim(tenant())
    assert await store.claim(claim, time.time(), LEASE)
    intruder = new_claim(claim.tenant, claim.key)
    assert not await store.fill(claim.tenant, claim.key, intruder.owner, {"x": 1}, 1, time.time(), TTL)
    assert await store.fill(claim.tenant, claim.key, claim.owner, {"text": "hi"}, 13, time.time(), TTL)
    found = await store.find(claim.tenant, claim.key)
    assert found is not None and (found.status, found.result) == (READY, {"text": "hi"})
    assert not await store.claim(intruder, time.time(), LEASE)  # a live, ready entry is not taken


async def test_the_hit_path_is_one_statement(engine: AsyncEngine) -> None:
    store = ReplayStore(engine)
    claim = new_claim(tenant())
    await ready(store, claim)
    counter = StatementCounter()
    try:
        assert await store.find(claim.tenant, claim.key) is not None
        assert counter.count == 1
    finally:
        counter.close()


async def test_a_given_up_or_lapsed_claim_is_taken_over(engine: AsyncEngine) -> None:
    store = ReplayStore(engine)
    claim = new_claim(tenant())
    now = time.time()
    assert await store.claim(claim, now, LEASE)
    waiter = new_claim(claim.tenant, claim.key)
    assert not await store.claim(waiter, now + LEASE - 1, LEASE)  # the lease still holds
    assert await store.claim(waiter, now + LEASE + 1, LEASE)  # the owner died: its lease ran out
    assert not await store.renew(claim.tenant, claim.key, claim.owner, now + 100)
    assert not await store.fill(claim.tenant, claim.key, claim.owner, {"late": 1}, 1, now, TTL)
    await store.abandon(waiter.tenant, waiter.key, waiter.owner)
    assert await store.find(claim.tenant, claim.key) is None


async def test_renewing_keeps_the_claim(engine: AsyncEngine) -> None:
    store = ReplayStore(engine)
    claim = new_claim(tenant())
    now = time.time()
    assert await store.claim(claim, now, LEASE)
    assert await store.renew(claim.tenant, claim.key, claim.owner, now + 3 * LEASE)
    assert not await store.claim(new_claim(claim.tenant, claim.key), now + 2 * LEASE, LEASE)


async def test_an_expired_entry_is_claimed_again(engine: AsyncEngine) -> None:
    store = ReplayStore(engine)
    claim = new_claim(tenant())
    await ready(store, claim)
    assert await store.claim(new_claim(claim.tenant, claim.key), time.time() + TTL + 1, LEASE)


async def test_refresh_takes_a_ready_entry_but_not_a_live_claim(engine: AsyncEngine) -> None:
    store = ReplayStore(engine)
    claim = new_claim(tenant())
    await ready(store, claim)
    refresher = new_claim(claim.tenant, claim.key)
    assert await store.claim(refresher, time.time(), LEASE, refresh=True)
    assert not await store.claim(new_claim(claim.tenant, claim.key), time.time(), LEASE, refresh=True)


async def test_tenants_do_not_share_entries(engine: AsyncEngine) -> None:
    store = ReplayStore(engine)
    claim = new_claim(tenant())
    await ready(store, claim)
    assert await store.find(tenant(), claim.key) is None


async def test_a_new_fingerprint_removes_the_models_other_entries(engine: AsyncEngine) -> None:
    store = ReplayStore(engine)
    who, model = tenant(), f"m-{uuid.uuid4().hex[:8]}"
    old, current, other_model = (
        new_claim(who, model=model, fingerprint="old"),
        new_claim(who, model=model, fingerprint="new"),
        new_claim(who, fingerprint="old"),
    )
    for claim in (old, current, other_model):
        await ready(store, claim)
    assert await store.drop_other_fingerprints(model, "new") == 1
    assert await store.find(who, old.key) is None
    assert (
        await store.find(who, current.key) is not None and await store.find(who, other_model.key) is not None
    )


@pytest.fixture(params=["sqlite", "postgres"])
async def fresh_engine(
    request: pytest.FixtureRequest, new_postgres_database: Any, tmp_path: Path
) -> AsyncIterator[AsyncEngine]:
    """A database of its own: the size bound counts every entry in it."""
    if request.param == "postgres":
        url = await asyncio.to_thread(new_postgres_database)
    else:
        url = f"sqlite+aiosqlite:///{tmp_path / 'r.db'}"
    await asyncio.to_thread(upgrade, url)
    engine = create_engine(url)
    try:
        yield engine
    finally:
        await dispose(engine)


async def test_purge_removes_expired_then_the_oldest_beyond_the_bound(fresh_engine: AsyncEngine) -> None:
    store = ReplayStore(fresh_engine)
    who, now = tenant(), time.time()
    claims = [new_claim(who) for _ in range(4)]
    for age, claim in enumerate(claims):
        await ready(store, claim, now + age)
    expired = new_claim(who)
    await ready(store, expired, now - TTL - 1)
    pending = new_claim(who)
    assert await store.claim(pending, now - 2 * LEASE, LEASE)
    await store.renew(who, pending.key, pending.owner, now + LEASE)
    assert await store.purge(now + 10, 2, 10**12) == (1, 2)
    assert await store.find(who, expired.key) is None
    assert [await store.find(who, claim.key) is not None for claim in claims] == [False, False, True, True]
    assert await store.find(who, pending.key) is not None  # a claim under way is never purged
    assert await store.purge(now + 10, 2, 10**12) == (0, 0)


async def test_purge_keeps_the_newest_entries_within_the_byte_bound(fresh_engine: AsyncEngine) -> None:
    store = ReplayStore(fresh_engine)
    who, now = tenant(), time.time()
    claims = [new_claim(who) for _ in range(4)]
    for age, claim in enumerate(claims):
        await ready(store, claim, now + age)  # 10 bytes each
    assert await store.purge(now, 100, 25) == (0, 2)
    assert [await store.find(who, claim.key) is not None for claim in claims] == [False, False, True, True]


async def test_management_selects_by_tenant_model_prefix_and_age(engine: AsyncEngine) -> None:
    store = ReplayStore(engine)
    who, model = tenant(), f"m-{uuid.uuid4().hex[:8]}"
    now = time.time()
    old = new_claim(who, "ab" + uuid.uuid4().hex + "0" * 30, model=model)
    young = new_claim(who, "cd" + uuid.uuid4().hex + "0" * 30, model=model)
    elsewhere = new_claim(tenant(), model=model)
    await ready(store, old, now - 100)
    await ready(store, young, now)
    await ready(store, elsewhere, now)
    mine = Selection(tenant=who)
    assert [e.key for e in await store.list(mine, 10)] == [old.key, young.key]
    assert [e.key for e in await store.list(Selection(tenant=who, key_prefix="ab"), 10)] == [old.key]
    assert [e.key for e in await store.list(Selection(tenant=who, created_before=now - 50), 10)] == [old.key]
    stats = await store.stats(Selection(model=model))
    assert sorted((s.tenant == who, s.entries, s.bytes) for s in stats) == [(False, 1, 10), (True, 2, 20)]
    assert await store.delete(Selection(tenant=who, key_prefix="cd")) == 1
    assert await store.delete(Selection(model=model)) == 2
    assert await store.list(Selection(model=model), 10) == []


async def test_a_key_prefix_is_not_a_pattern(engine: AsyncEngine) -> None:
    store = ReplayStore(engine)
    who = tenant()
    await ready(store, new_claim(who))
    assert await store.delete(Selection(tenant=who, key_prefix="%")) == 0


async def test_export_and_import_round_trip(engine: AsyncEngine) -> None:
    store = ReplayStore(engine)
    who = tenant()
    claims = [new_claim(who) for _ in range(5)]
    for age, claim in enumerate(claims):
        await ready(store, claim, time.time() + age, reply=f"answer {age}")
    exported = await export(store, Selection(tenant=who), page=2)
    assert [e.key for e in exported] == [c.key for c in claims]
    assert exported[0].result == {"text": "answer 0"} and exported[0].request == {"model": "m"}
    assert await store.delete(Selection(tenant=who)) == 5
    assert await store.load(exported) == 5
    assert await store.load([]) == 0
    assert await export(store, Selection(tenant=who), page=100) == exported
    # An import never replaces a newer entry with an older one.
    older = replace(exported[0], created_at=exported[0].created_at - 1, result={"text": "old"})
    await store.load([older])
    found = await store.find(who, claims[0].key)
    assert found is not None and found.result == {"text": "answer 0"}


async def export(store: ReplayStore, selection: Selection, page: int) -> list[Entry]:
    """Every selected entry, a page at a time, as the admin API's export does."""
    entries: list[Entry] = []
    after = None
    while batch := await store.list(selection, page, after=after, whole=True):
        entries += batch
        after = (batch[-1].created_at, batch[-1].key)
    return entries


async def test_a_tenant_opts_in(engine: AsyncEngine) -> None:
    tenants = TenantStore(engine)
    who = tenant()
    assert (await tenants.current(who)).replay_cache is False
    updated = await tenants.set_replay_cache(who, True, actor="test", now=time.time())
    assert updated is not None and updated.replay_cache is True
    assert (await tenants.current(who)).replay_cache is True
