"""Chain histories kept in the process (service/domain/histories.py): the cache by itself, and a service
that keeps them rendering, turn for turn, the prompts of one that reads every history from the database,
over random forests of chains with forks, on SQLite and Postgres, with one statement fewer per full-path
turn whose parent it kept."""

from __future__ import annotations

import random
from typing import Any

import pytest

from service.domain.histories import HistoryCache
from tests.conftest import Service, db_counts

MODEL = "ref-chatml"


def _item(text: str, role: str = "user") -> dict[str, Any]:
    return {
        "id": f"msg_{text}",
        "type": "message",
        "role": role,
        "content": [{"type": "input_text", "text": text}],
    }


def test_a_kept_history_is_its_parents_then_its_own_input_and_output() -> None:
    cache = HistoryCache(1 << 20)
    cache.keep("t", "a", [(False, [_item("a")]), (True, [_item("ra", "assistant")])])
    cache.extend("t", "a", "b", [_item("b")], [_item("rb", "assistant")])
    cache.extend("t", "b", "c", [_item("c")], [])  # no output: no empty segment
    cache.extend("t", None, "root", [_item("first")], [_item("r1", "assistant")])
    assert cache.get("t", "c") == (
        (False, [_item("a")]),
        (True, [_item("ra", "assistant")]),
        (False, (_item("b"),)),
        (True, (_item("rb", "assistant"),)),
        (False, (_item("c"),)),
    )
    assert cache.get("t", "root") == ((False, (_item("first"),)), (True, (_item("r1", "assistant"),)))
    assert cache.get("other tenant", "c") is None
    cache.extend("t", "unknown", "d", [_item("d")], [])
    assert cache.get("t", "d") is None  # its parent's history is not kept: nothing to build on


def test_the_least_recently_used_history_goes_first_and_none_is_kept_past_the_limit() -> None:
    one = len(b'{"id":"msg_a","type":"message","role":"user","content":[{"type":"input_text","text":"a"}]}')
    cache = HistoryCache(3 * one)
    for name in "abc":
        cache.extend("t", None, name, [_item(name)], [])
    assert cache.size == 3 * one
    cache.get("t", "a")
    cache.extend("t", None, "d", [_item("d")], [])
    assert [cache.get("t", name) is not None for name in "abcd"] == [True, False, True, True]
    cache.extend("t", "d", "e", [_item("e")], [_item("f")])  # 3 items: fills the cache alone
    assert [cache.get("t", name) is not None for name in "acde"] == [False, False, False, True]
    cache.extend("t", "e", "g", [_item("g")], [])  # 4 items: larger than the cache
    assert cache.get("t", "g") is None and cache.get("t", "e") is not None
    off = HistoryCache(0)
    off.extend("t", None, "a", [_item("a")], [])
    assert off.get("t", "a") is None and off.size == 0


@pytest.mark.parametrize("dialect", ["sqlite", "postgres"])
def test_kept_histories_render_what_the_database_renders(service_factory: Any, dialect: str) -> None:
    kept: Service = service_factory(dialect)
    read: Service = service_factory(dialect, history_cache_bytes=0)
    hits, misses = _kept_histories(kept)
    rng = random.Random(7)
    ids: dict[str, list[str]] = {"kept": [], "read": []}
    statements: dict[str, list[int]] = {"kept": [], "read": []}
    for turn in range(40):
        # A new chain now and then, else a child of any earlier turn: straight runs and forks.
        parent = None if turn % 13 == 0 else rng.randrange(len(ids["kept"]))
        text = f"turn {turn}: " + " ".join(rng.choice(["alpha", "beta", "gamma", "delta"]) for _ in range(8))
        digests = set()
        for name, service in (("kept", kept), ("read", read)):
            raw = service.openai().responses.with_raw_response.create(
                model=MODEL,
                input=text,
                previous_response_id=None if parent is None else ids[name][parent],
                max_output_tokens=16,
            )
            ids[name].append(raw.parse().id)
            digests.add(raw.headers["x-convstate-prompt-digest"])
            if parent is not None:
                statements[name].append(db_counts(raw.headers)[0])
        assert len(digests) == 1, f"turn {turn}: the kept history rendered another prompt"
    # The history read is the one statement a kept history saves (on Postgres a turn is then the parent
    # read and the write). Round trips also count statements prepared on a new connection.
    assert [count - 1 for count in statements["read"]] == statements["kept"]
    if dialect == "postgres":
        assert set(statements["kept"]) == {2}
    # Every turn of the keeping service found its parent's history kept; every turn of the other read it.
    assert _kept_histories(kept) == (hits + len(statements["kept"]), misses + len(statements["read"]))


def _kept_histories(service: Service) -> tuple[float, float]:
    """convstate_kept_histories_total by result (hit, miss): one registry for every service in this
    process, so callers compare before and after."""
    counts = dict.fromkeys(("hit", "miss"), 0.0)
    for line in service.http().get("/metrics").text.splitlines():
        if line.startswith("convstate_kept_histories_total{"):
            result = line.split('result="', 1)[1].split('"', 1)[0]
            counts[result] = float(line.rsplit(" ", 1)[1])
    return counts["hit"], counts["miss"]
