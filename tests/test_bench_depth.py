"""bench.depth's interleaved rounds: the order of the probe's turns and of the paired comparison's, and
their summaries (deep against shallow, this checkout against a baseline)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from bench import instructions
from bench.depth import DEEP, RoundTurn, Side, paired, probe, summarize_paired, summarize_probe
from bench.harness import Turn

HIT = "cache_ref; reason=hit"


def _turn(conversation: int, turn: int, overhead_ms: float, status: int = 200) -> Turn:
    sample = Turn(conversation, turn, 0.0, overhead_ms + 4.0, status, decision=HIT)
    sample.overhead_ms, sample.backend_ms, sample.db_ms = overhead_ms, 4.0, overhead_ms / 2
    sample.statements, sample.round_trips = 2, 2
    if status != 200:
        sample.error = f"HTTP {status}"
    return sample


def _rounds(deep: list[float], shallow: list[float], cpu_ms: float = 1.0) -> list[RoundTurn]:
    samples = []
    for index, (deep_ms, shallow_ms) in enumerate(zip(deep, shallow, strict=True)):
        samples.append(RoundTurn(index, True, _turn(DEEP, 201 + index, deep_ms), cpu_ms))
        samples.append(RoundTurn(index, False, _turn(DEEP + 1 + index, 2, shallow_ms), cpu_ms))
    return samples


def test_probe_alternates_deep_and_shallow_after_each_fresh_lineage_opens() -> None:
    calls: list[tuple[int, int]] = []

    def driver(conversation: int, turn: int) -> Turn:
        calls.append((conversation, turn))
        return _turn(conversation, turn, 3.0)

    samples = probe(driver, deep_turns=200, rounds=3, service_pid=None)

    fresh = [DEEP + 1, DEEP + 2, DEEP + 3]
    assert calls == [
        (fresh[0], 1), (DEEP, 201), (fresh[0], 2),
        (fresh[1], 1), (fresh[1], 2), (DEEP, 202),
        (fresh[2], 1), (DEEP, 203), (fresh[2], 2),
    ]  # fmt: skip
    assert [(s.round, s.first) for s in samples] == [
        (0, True), (0, False), (1, False), (1, True), (2, True), (2, False)
    ]  # fmt: skip
    assert all(math.isnan(s.service_cpu_ms) for s in samples)


def test_probe_stops_at_a_failed_turn() -> None:
    def driver(conversation: int, turn: int) -> Turn:
        return _turn(conversation, turn, 3.0, status=500 if turn == 202 else 200)

    samples = probe(driver, deep_turns=200, rounds=5, service_pid=None)

    assert [(s.round, s.first, s.sample.error) for s in samples] == [
        (0, True, None), (0, False, None), (1, False, None), (1, True, "HTTP 500")
    ]  # fmt: skip


def test_summary_sets_each_sides_median_and_p99_against_the_others() -> None:
    summary = summarize_probe(_rounds([2.0, 4.0, 6.0, 8.0, 10.0], [1.0, 2.0, 3.0, 4.0, 5.0]))

    overhead = summary["overhead_ms"]
    assert (overhead["deep_median"], overhead["shallow_median"]) == (6.0, 3.0)
    assert overhead["median_deep_over_shallow"] == 2.0
    # Linear interpolation between the two largest of five: 8 + 0.96 * 2.
    assert (overhead["deep_p99"], overhead["shallow_p99"]) == (9.92, 4.96)
    assert overhead["p99_deep_over_shallow"] == 2.0
    # Every round's deep turn is twice its shallow one: resampling whole rounds keeps the pairs, so
    # every resample's ratio is exactly 2.
    assert overhead["median_ratio_95"] == [2.0, 2.0]
    assert summary["db_ms"]["median_deep_over_shallow"] == 2.0
    assert summary["statements"]["median_deep_over_shallow"] == 1.0
    assert summary["service_cpu_ms"]["deep_median"] == 1.0
    assert summary["rounds"] == 5
    assert summary["deep_turns"] == [201, 205]
    assert summary["decisions"] == {"deep": {HIT: 5}, "shallow": {HIT: 5}}


def test_summary_interval_brackets_the_ratio_of_noisy_rounds() -> None:
    deep = [3.0, 3.4, 2.9, 3.8, 3.1, 3.3, 5.0, 3.0, 3.2, 3.6]
    shallow = [3.1, 2.8, 3.0, 3.5, 2.9, 3.2, 3.0, 4.4, 3.1, 3.0]

    overhead = summarize_probe(_rounds(deep, shallow))["overhead_ms"]

    low, high = overhead["median_ratio_95"]
    assert low < overhead["median_deep_over_shallow"] < high
    assert low < 1.0 < high


def test_summary_leaves_out_rounds_with_a_failed_turn_and_metrics_not_measured() -> None:
    samples = _rounds([3.0, 3.0, 3.0], [3.0, 3.0, 3.0], cpu_ms=math.nan)
    samples[3] = RoundTurn(1, False, _turn(DEEP + 2, 2, 90.0, status=500), math.nan)

    summary = summarize_probe(samples)

    assert (summary["rounds"], summary["errors"]) == (2, 1)
    assert summary["overhead_ms"]["shallow_p99"] == 3.0
    assert summary["deep_turns"] == [201, 203]
    assert "service_cpu_ms" not in summary


def _drifting_side(calls: list[tuple[str, int, int]], name: str, cost: float) -> Side:
    """A service whose turn costs `cost` times a factor that drifts with the turn (the machine)."""

    def driver(conversation: int, turn: int) -> Turn:
        calls.append((name, conversation, turn))
        return _turn(conversation, turn, cost * (1 + (turn * 7) % 5))

    return Side(driver, None)


def test_paired_rounds_alternate_the_two_services_at_the_same_depth() -> None:
    calls: list[tuple[str, int, int]] = []
    current, baseline = _drifting_side(calls, "current", 1.0), _drifting_side(calls, "baseline", 2.0)

    samples = paired(current, baseline, first_turn=201, rounds=3)

    assert calls == [
        ("current", DEEP, 201), ("baseline", DEEP, 201),
        ("baseline", DEEP, 202), ("current", DEEP, 202),
        ("current", DEEP, 203), ("baseline", DEEP, 203),
    ]  # fmt: skip
    assert [(s.round, s.first) for s in samples] == [
        (0, True), (0, False), (1, False), (1, True), (2, True), (2, False)
    ]  # fmt: skip


def test_paired_summary_sets_each_round_s_current_turn_against_its_baseline_turn() -> None:
    current, baseline = _drifting_side([], "current", 1.0), _drifting_side([], "baseline", 2.0)

    summary = summarize_paired(paired(current, baseline, first_turn=201, rounds=40))

    overhead = summary["overhead_ms"]
    assert summary["rounds"] == 40
    assert summary["current_turns"] == [201, 240]
    assert (overhead["current_median"], overhead["baseline_median"]) == (3.0, 6.0)
    assert overhead["median_current_over_baseline"] == 0.5
    assert overhead["p99_current_over_baseline"] == 0.5
    # The machine's drift moves both turns of a round alike: resampling whole rounds, each current
    # turn with its own baseline turn, every resample's ratio is 0.5; turns set against another
    # round's would spread it.
    assert overhead["median_ratio_95"] == [0.5, 0.5]
    assert summary["statements"]["median_current_over_baseline"] == 1.0
    assert "service_cpu_ms" not in summary
    assert summary["decisions"] == {"current": {HIT: 40}, "baseline": {HIT: 40}}


def test_instructions_are_read_from_the_dump_summary(tmp_path: Path) -> None:
    dump = tmp_path / "callgrind.out.1.1"
    dump.write_text(
        "version: 1\ncreator: callgrind-3.19.0\nevents: Ir\nsummary: 307554167\ntotals: 360155649\n"
    )
    assert instructions.summary(dump) == 307_554_167
    dump.write_text("events: Ir\ntotals: 1\n")
    with pytest.raises(ValueError):
        instructions.summary(dump)
