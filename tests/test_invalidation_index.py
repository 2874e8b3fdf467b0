"""The invalidation index (pure) and the watcher that feeds it (on both databases; NOTIFY on Postgres)."""

from __future__ import annotations

import asyncio
import math
import time

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from service.domain.fingerprint import PARTS as FINGERPRINT_PARTS
from service.domain.fingerprint import combined_fingerprint
from service.domain.invalidation import InvalidationIndex, Rule, Scope, Subject, fingerprint_key, handle_state
from service.store.db import create_engine, dispose
from service.store.invalidations import Change, InvalidationStore
from service.workers.invalidations import CLOCK_MARGIN, InvalidationWatcher

PARTS = {"model": "m1", "tools": "t1", "chat_template": "c1"}


def _subject(**overrides: object) -> Subject:
    fields: dict[str, object] = {
        "tenant": "acme",
        "model": "m",
        "conversation_id": "conv_1",
        "lineage_root": "resp_root",
        "depth": 3,
        "fingerprint_parts": PARTS,
    }
    fields.update(overrides)
    return Subject(**fields)  # type: ignore[arg-type]


def _rule(
    scope: Scope, key: str | None, at: float = 100.0, root: str | None = None, depth: int | None = None
) -> Rule:
    return Rule(1, scope, key, root, depth, at)


@pytest.mark.parametrize(
    ("rule", "covered"),
    [
        (_rule(Scope.ALL, None), True),
        (_rule(Scope.TENANT, "acme"), True),
        (_rule(Scope.TENANT, "other"), False),
        (_rule(Scope.MODEL, "m"), True),
        (_rule(Scope.MODEL, "m2"), False),
        (_rule(Scope.CONVERSATION, "conv_1"), True),
        (_rule(Scope.CONVERSATION, "conv_2"), False),
        (_rule(Scope.FINGERPRINT, fingerprint_key("tools", "t1")), True),
        (_rule(Scope.FINGERPRINT, fingerprint_key("tools", "t2")), False),
        (_rule(Scope.FINGERPRINT, fingerprint_key("model", "t1")), False),
        (_rule(Scope.RESPONSE, "resp_x", root="resp_root", depth=3), True),  # the response itself
        (_rule(Scope.RESPONSE, "resp_x", root="resp_root", depth=1), True),  # an ancestor's descendants
        (_rule(Scope.RESPONSE, "resp_x", root="resp_root", depth=4), False),  # a descendant
        (_rule(Scope.RESPONSE, "resp_x", root="resp_other", depth=0), False),
        (_rule(Scope.TENANT_CONFIG, "acme"), False),
        (_rule(Scope.API_KEY, "key_1"), False),
    ],
)
def test_each_scope_covers_its_subjects(rule: Rule, covered: bool) -> None:
    index = InvalidationIndex(window=2.0)
    index.add(rule)
    assert index.cutoff(_subject()) == (102.0 if covered else None)


def test_combined_fingerprint_and_latest_cutoff() -> None:
    parts = {"a": "1"}
    index = InvalidationIndex(window=0.0)
    index.add(_rule(Scope.TENANT, "acme", at=5.0))
    index.add(_rule(Scope.TENANT, "acme", at=3.0))
    assert index.cutoff(_subject(fingerprint_parts=parts)) == 5.0
    full = {name: name for name in FINGERPRINT_PARTS}
    combined = combined_fingerprint(full)
    assert combined is not None
    index.add(_rule(Scope.FINGERPRINT, fingerprint_key(None, combined), at=9.0))
    assert index.cutoff(_subject(fingerprint_parts=full)) == 9.0
    with pytest.raises(ValueError, match="unknown fingerprint part"):
        fingerprint_key("colour", "x")


def test_handle_state() -> None:
    base = {
        "record_status": "valid",
        "invalid_reason": None,
        "handle_ref": "pc_1",
        "handle_expires_at": 200.0,
        "record_created_at": 100.0,
        "cutoff": None,
        "now": 150.0,
    }
    assert handle_state(**base) == "valid"  # type: ignore[arg-type]
    assert handle_state(**{**base, "cutoff": 100.0}) == "invalidated:scope"  # type: ignore[arg-type]
    assert handle_state(**{**base, "cutoff": 99.0}) == "valid"  # type: ignore[arg-type]
    assert handle_state(**{**base, "now": 201.0}) == "expired"  # type: ignore[arg-type]
    assert handle_state(**{**base, "record_status": "invalidated", "invalid_reason": "canary_mismatch"}) == (  # type: ignore[arg-type]
        "invalidated:canary_mismatch"
    )
    assert handle_state(**{**base, "handle_ref": None}) == "none"  # type: ignore[arg-type]


async def test_watcher_follows_the_feed(engine: AsyncEngine) -> None:
    """On Postgres with a max lag of a minute (a poll every 15 s) NOTIFY still brings a row within a
    second; SQLite has only the poll."""
    forgotten: list[str] = []
    max_lag = 60.0 if engine.dialect.name == "postgresql" else 1.0
    feed = create_engine(engine.url)
    watcher = InvalidationWatcher(
        feed, max_lag, on_tenant_config=forgotten.append, on_api_key=forgotten.append
    )
    await watcher.sync()
    running = asyncio.get_running_loop().create_task(watcher.run())
    try:
        await asyncio.sleep(0.3)  # listening
        store, now = InvalidationStore(engine), time.time()
        await store.add(Change(Scope.TENANT_CONFIG, "acme-feed", "salt", "test", now))
        await store.add(Change(Scope.TENANT, "acme-feed", "test", "test", now))
        subject = _subject(tenant="acme-feed")
        deadline = time.monotonic() + 1.0
        while watcher.index.cutoff(subject) is None:
            assert time.monotonic() < deadline, "the feed did not arrive"
            await asyncio.sleep(0.02)
        assert watcher.index.cutoff(subject) == pytest.approx(now + max_lag + CLOCK_MARGIN)
        assert "acme-feed" in forgotten
        assert watcher.fresh()
    finally:
        running.cancel()
        async with asyncio.timeout(10):  # a watcher that ignores its cancel fails here, never hangs
            await asyncio.gather(running, return_exceptions=True)
        await dispose(feed)


async def test_a_stale_view_invalidates_everything(engine: AsyncEngine) -> None:
    feed = create_engine(engine.url)
    watcher = InvalidationWatcher(feed, 0.05, on_tenant_config=print, on_api_key=print)
    assert not watcher.fresh()  # never synced: fail closed
    assert watcher.cutoff(_subject()) == math.inf
    await watcher.sync()
    assert watcher.fresh() and watcher.cutoff(_subject(tenant="nobody", model="none")) is None
    await asyncio.sleep(0.1)
    assert watcher.cutoff(_subject()) == math.inf
    await dispose(feed)
