"""Per-turn cost against conversation depth: one conversation of N sequential turns per pass.

    python -m bench.depth [--turns 200] [--modes full,cache_ref] [--lineages chain,conversation]
                          [--baseline REV] [--direct] [--target NAME=URL ...] [--target-model MODEL]
                          [--target-pid NAME=PID ...] [--target-database NAME=DATABASE ...]
                          [--probe-rounds K] [--paired-rounds K] [--prefill-us US]

A pass is one target, backend mode and lineage: a chain of `previous_response_id` or a `conversation`.
Targets, all on the same reference backend and measured in the same run:

- convstate as checked out (`convstate`), in every mode and lineage;
- `--baseline REV`: convstate at another revision (`git archive`, its own migrations), the same passes,
  interleaved with the current ones so both see the same machine;
- `--direct`: no state service, the client sends the whole history to the backend's chat completions
  itself (the floor any Responses server adds to);
- `--target NAME=URL`: any other Responses server (`URL` its base, with `/v1`), pointed by its operator
  at the reference backend this run starts (its URL is printed and in the summary; start it with
  `--backend-port`), chains only unless it serves conversations. `--target-model` is the backend's
  model as those servers name it; `--target-pid` measures a server's CPU per turn and
  `--target-database` counts what Postgres executes per turn for a server whose store is a database on
  this run's Postgres server (`CONVSTATE_BENCH_DATABASE_URL`).

With `--direct`, every pass's end-to-end time is also reported over the direct call at the same depth
(`over_direct_ms`): what a client pays for letting that server keep the state, whether or not the
server says where its time goes.

For every turn it records the end-to-end time and, from convstate's Server-Timing, the service overhead
(total - backend), database time, statements and round trips; bytes posted to the backend, prompt
tokens the backend rendered, the decision. Per pass: what Postgres itself executed per turn
(pg_stat_statements: foreign-key checks, BEGIN and COMMIT included), CPU per turn of each process, and
how busy the machine was (load average, CPU of other processes). Ratios within one run are what counts
on a shared machine.

The early and late windows of a pass are measured minutes apart, so the machine's load can decide their
ratio. After each pass has built its lineage of N turns, an interleaved probe (`--probe-rounds K`,
default 40; 0 turns it off) sets deep against shallow turns on the same machine: K rounds, each one
turn on the deep lineage (turn N+1, N+2, ...) and the second turn of a fresh lineage of the same kind,
whose first turn is made unmeasured at the start of the round, the two in alternating order. Its
summary (`probe` in each pass, also printed as a table on stderr) gives, deep and shallow, the median
and p99 of the service overhead, database time, statements, round trips, the service's CPU while the
turn was in flight (from its threads' schedstat; background work that ran meanwhile included), the
backend's time and the end-to-end time, their ratios, and a 95% interval for the ratio of medians from
resampling whole rounds. The probe's turns are not in the pass's figures.

Passes of two revisions are also minutes apart, and on a shared or virtual machine the same code's
CPU per turn moves by up to 2x between passes, so their ratio is the machine's. With `--baseline`, a
paired comparison (`--paired-rounds K`, default 200; 0 turns it off) sets the two revisions against
each other on the same machine, for each lineage and mode: both services run at once, each on its own
fresh database and the same reference backend; each is warmed up and builds one lineage to N turns;
then K rounds, each one turn on this checkout's lineage and one on the baseline's, at the same depth,
the two in alternating order. Its summary (`comparison.<lineage>.<mode>_paired_against_baseline`,
also printed as a table on stderr; the passes' own ratios stay beside it) gives, current and
baseline, the median and p99 of the same metrics as the probe, their ratios and a 95% interval for
the ratio of medians from resampling whole rounds. Two CPU figures, which answer different questions:

- `service_cpu_ms` per turn: the service's threads' CPU while that turn was in flight (schedstat,
  before and after the turn). What the turn itself costs; background work that lands between turns
  (the token-artifact writer's batches every 0.25 s, the invalidation feed's poll) is missed, and
  background work that happens to run during the turn is counted.
- `process_cpu_ms_per_round`: each service's whole-process CPU over the K rounds divided by K
  (clock ticks). Everything the service spent, background work included; both services ran through
  the same window, so it is paired too, by window rather than by turn.

The reference backend costs nothing but its own work, which grows with the prompt behind a handle, so a
deep `cache_ref` turn waits longer for it than a shallow one. `--prefill-us US` turns on its simulated
prefill (a sleep of US microseconds per prompt token not in its prefix cache): then every turn waits
for the backend about as long as a real model makes it, deep or shallow.
"""

from __future__ import annotations

import argparse
import io
import math
import os
import random
import statistics
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import openai
from sqlalchemy.engine import make_url

from bench import harness, profile
from bench.harness import Turn

NAME = "depth"
MODES = ("full", "cache_ref")
LINEAGES = ("chain", "conversation")
DIRECT = "direct/-/client-history"  # the name of the --direct pass
SMOOTHING = 9  # turns in the rolling medians of the plot and of the direct floor
WARMUP_TURNS = 5  # a separate conversation first, so statement preparation and pool growth are not measured
DEEP = 1  # the measured lineage's index (the warm-up's is 0); the probe's fresh lineages come after it
PROBE_ROUNDS = 40
ROUND_METRICS = (  # what both sides of a probe or paired round are compared on
    "overhead_ms",
    "db_ms",
    "statements",
    "round_trips",
    "service_cpu_ms",
    "backend_ms",
    "e2e_ms",
)
RESAMPLES = 2000  # of a probe's or paired comparison's rounds, for the interval of a ratio of medians
PAIRED_ROUNDS = 200
ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True, slots=True)
class Target:
    """Where turns go: a convstate service started from `source` (None: this checkout), the backend
    directly (`direct`), or an external Responses server at `url`."""

    name: str
    source: Path | None = None
    url: str | None = None
    direct: bool = False
    model: str = harness.MODEL
    pid: int | None = None  # an external server's process, for its CPU per turn
    database: str | None = None  # an external server's database on the run's Postgres server

    @property
    def convstate(self) -> bool:
        return self.url is None and not self.direct


@dataclass(frozen=True, slots=True)
class Pass:
    target: Target
    mode: str  # the backend mode of a convstate target; "-" otherwise
    lineage: str

    @property
    def name(self) -> str:
        return f"{self.target.name}/{self.mode}/{self.lineage}"


@dataclass(frozen=True, slots=True)
class RoundTurn:
    """One measured turn of an interleaved round, on one of its two sides: in the probe, the pass's deep
    lineage (`first`) or the second turn of a fresh one; in the paired comparison, this checkout
    (`first`) or the baseline."""

    round: int
    first: bool
    sample: Turn
    service_cpu_ms: float  # the service's threads' CPU while the turn was in flight; NaN if unknown

    def value(self, metric: str) -> float:
        return self.service_cpu_ms if metric == "service_cpu_ms" else float(getattr(self.sample, metric))


def _window(samples: Sequence[Turn], first: int, last: int, attribute: str) -> float:
    values = [float(getattr(s, attribute)) for s in samples if first <= s.turn <= last]
    return statistics.median(values) if values else float("nan")


# --- drivers: one turn of a lineage, whatever answers it -------------------------------------------


Driver = Callable[[int, int], Turn]


def responses_driver(
    base_url: str, api_key: str, lineage: str, max_output_tokens: int, model: str = harness.MODEL
) -> Driver:
    """Turns of one lineage per conversation index through the openai SDK (a Responses server)."""
    client = openai.OpenAI(base_url=base_url, api_key=api_key or "none", max_retries=0, timeout=120)
    state: dict[int, str] = {}

    def one(conversation: int, turn: int) -> Turn:
        continuation: dict[str, Any] = {}
        if lineage == "conversation":
            if conversation not in state:
                state[conversation] = client.conversations.create().id
            continuation["conversation"] = state[conversation]
        elif conversation in state:
            continuation["previous_response_id"] = state[conversation]
        start = time.perf_counter()
        raw = client.responses.with_raw_response.create(
            model=model,
            instructions=harness.INSTRUCTIONS,
            input=harness.turn_text(conversation, turn),
            max_output_tokens=max_output_tokens,
            **continuation,
        )
        elapsed = (time.perf_counter() - start) * 1000
        if lineage == "chain":
            # The id only: building the SDK's typed object would cost the driver more than the turn.
            state[conversation] = raw.http_response.json()["id"]
        return harness.measured_turn(conversation, turn, 0.0, elapsed, raw.status_code, raw.headers)

    return one


def direct_driver(backend_url: str, max_output_tokens: int) -> Driver:
    """The client keeps the history and sends it whole to the backend's chat completions every turn."""
    client = httpx.Client(base_url=backend_url, timeout=120)
    histories: dict[int, list[dict[str, str]]] = {}

    def one(conversation: int, turn: int) -> Turn:
        messages = histories.setdefault(conversation, [{"role": "system", "content": harness.INSTRUCTIONS}])
        messages.append({"role": "user", "content": harness.turn_text(conversation, turn)})
        body = {"model": harness.MODEL, "messages": messages, "max_tokens": max_output_tokens}
        start = time.perf_counter()
        reply = client.post("/v1/chat/completions", json=body)
        elapsed = (time.perf_counter() - start) * 1000
        sample = Turn(conversation, turn, 0.0, elapsed, reply.status_code)
        sample.bytes_sent = len(reply.request.content)
        if reply.status_code != 200:
            sample.error = reply.text[:300]
            return sample
        messages.append({"role": "assistant", "content": reply.json()["choices"][0]["message"]["content"]})
        return sample

    return one


# --- one pass --------------------------------------------------------------------------------------


def run_pass(
    run: Pass,
    server_url: str,
    backend: harness.Process,
    turns: int,
    probe_rounds: int,
    max_output_tokens: int,
    record_profile: Path | None,
    postmaster: int | None,
) -> tuple[list[Turn], dict[str, Any]]:
    """The samples of one conversation, and what the pass cost (CPU, machine, database statements) with
    the probe's summary."""
    if run.target.direct:
        driver = direct_driver(backend.url, max_output_tokens)
        return _measure(driver, backend, {}, turns, probe_rounds, None)
    if run.target.url is not None:
        key = os.environ.get("BENCH_TARGET_API_KEY", "")
        driver = responses_driver(run.target.url, key, run.lineage, max_output_tokens, run.target.model)
        database_url = (
            make_url(server_url).set(database=run.target.database).render_as_string(hide_password=False)
            if run.target.database
            else None
        )
        processes = {"service": run.target.pid} if run.target.pid else {}
        return _measure(driver, backend, processes, turns, probe_rounds, postmaster, database_url)
    with (
        harness.fresh_database(server_url, source=run.target.source) as database_url,
        harness.launch_service_from(
            run.target.source, database_url, backend.url, run.mode, {}
        ).wait_ready() as service,
    ):
        driver = responses_driver(f"{service.url}/v1", service.api_key, run.lineage, max_output_tokens)
        recorder = profile.Recorder(service.pid, record_profile) if record_profile else None
        try:
            service_pid = {"service": service.pid}
            return _measure(driver, backend, service_pid, turns, probe_rounds, postmaster, database_url)
        finally:
            if recorder is not None:
                recorder.stop()


def _measure(
    one: Driver,
    backend: harness.Process,
    servers: dict[str, int],
    turns: int,
    probe_rounds: int,
    postmaster: int | None,
    database_url: str | None = None,
) -> tuple[list[Turn], dict[str, Any]]:
    """`servers`: the state service's process by name, when its CPU can be measured; `postmaster`: the
    Postgres server a state service may use (None for the backend called directly). The probe runs
    once the pass's own figures are taken."""
    for turn in range(1, WARMUP_TURNS + 1):
        one(0, turn)
    if database_url is not None:
        harness.reset_statements(database_url)
    load_before = os.getloadavg()
    meter = harness.CpuMeter({"backend": backend.pid} | servers, postmaster)
    stats = httpx.Client(base_url=backend.url, timeout=10)
    before = stats.get("/stats").json()["tokens_rendered"]
    samples: list[Turn] = []
    for turn in range(1, turns + 1):
        sample = one(DEEP, turn)
        after = stats.get("/stats").json()["tokens_rendered"]
        sample.rendered_tokens = after - before
        samples.append(sample)
        before = after
        if sample.error is not None:
            harness.log(f"turn {turn} failed: {sample.error}")
            break
    cost: dict[str, Any] = meter.stop(len(samples))
    stats.close()
    cost["load_average_before_after"] = [round(load_before[0], 2), round(os.getloadavg()[0], 2)]
    if database_url is not None:
        cost["postgres_statements_per_turn"] = harness.executed_statements(database_url, len(samples))
    if probe_rounds and samples[-1].error is None:
        harness.log(f"probe: {probe_rounds} rounds")
        cost["probe"] = summarize_probe(probe(one, len(samples), probe_rounds, servers.get("service")))
    return samples, cost


def probe(one: Driver, deep_turns: int, rounds: int, service_pid: int | None) -> list[RoundTurn]:
    """Deep and shallow turns interleaved, so that both see the same machine: each round one turn on the
    deep lineage (turn `deep_turns` + 1, + 2, ...) and the second turn of a fresh lineage, whose first
    turn is made unmeasured at the start of the round; which of the two goes first alternates."""
    samples: list[RoundTurn] = []
    for round_ in range(rounds):
        fresh = DEEP + 1 + round_
        opening = one(fresh, 1)
        if opening.error is not None:
            harness.log(f"probe round {round_}: a fresh lineage's first turn failed: {opening.error}")
            break
        deep_first = round_ % 2 == 0
        for deep in (deep_first, not deep_first):
            lineage, turn = (DEEP, deep_turns + 1 + round_) if deep else (fresh, 2)
            sample, cpu_ms = _turn_with_cpu(one, lineage, turn, service_pid)
            samples.append(RoundTurn(round_, deep, sample, cpu_ms))
            if sample.error is not None:
                harness.log(f"probe round {round_} failed: {sample.error}")
                return samples
    return samples


def _turn_with_cpu(one: Driver, lineage: int, turn: int, service_pid: int | None) -> tuple[Turn, float]:
    """A turn and the service's threads' CPU while it was in flight (NaN without the service's pid)."""
    cpu_before = harness.threads_cpu_ms(service_pid) if service_pid else math.nan
    sample = one(lineage, turn)
    return sample, harness.threads_cpu_ms(service_pid) - cpu_before if service_pid else math.nan


# --- the paired comparison: this checkout and the baseline at once ---------------------------------


@dataclass(frozen=True, slots=True)
class Side:
    """One of the paired comparison's two services: how to make its turns, and its process."""

    one: Driver
    pid: int | None


def paired(current: Side, baseline: Side, first_turn: int, rounds: int) -> list[RoundTurn]:
    """Each round one turn on this checkout's lineage and one on the baseline's, both turn
    `first_turn` + round (the lineages were built to the same depth); which goes first alternates."""
    samples: list[RoundTurn] = []
    for round_ in range(rounds):
        current_first = round_ % 2 == 0
        for is_current in (current_first, not current_first):
            side = current if is_current else baseline
            sample, cpu_ms = _turn_with_cpu(side.one, DEEP, first_turn + round_, side.pid)
            samples.append(RoundTurn(round_, is_current, sample, cpu_ms))
            if sample.error is not None:
                harness.log(f"paired round {round_} failed: {sample.error}")
                return samples
    return samples


def run_paired(
    mode: str,
    lineage: str,
    baseline_source: Path,
    server_url: str,
    backend: harness.Process,
    turns: int,
    rounds: int,
    max_output_tokens: int,
    postmaster: int | None,
) -> dict[str, Any]:
    """Both services started at once on fresh databases, warmed up, a lineage of `turns` turns built on
    each, then `rounds` paired rounds: their summary, with each process's CPU over the rounds."""
    with ExitStack() as stack:
        sides: list[Side] = []
        services = []
        for source in (None, baseline_source):
            database_url = stack.enter_context(harness.fresh_database(server_url, source=source))
            services.append(
                stack.enter_context(harness.launch_service_from(source, database_url, backend.url, mode, {}))
            )
        for service in services:
            service.wait_ready()
            driver = responses_driver(f"{service.url}/v1", service.api_key, lineage, max_output_tokens)
            sides.append(Side(driver, service.pid))
        current, baseline = sides
        for conversation, length in ((0, WARMUP_TURNS), (DEEP, turns)):
            for turn in range(1, length + 1):
                for side in sides:
                    if (sample := side.one(conversation, turn)).error is not None:
                        raise RuntimeError(f"paired {mode}/{lineage}: turn {turn} failed: {sample.error}")
        load_before = os.getloadavg()
        processes = {"current": services[0].pid, "baseline": services[1].pid, "backend": backend.pid}
        meter = harness.CpuMeter(processes, postmaster)
        samples = paired(current, baseline, turns + 1, rounds)
        cost = meter.stop(len({sample.round for sample in samples}))
    summary = summarize_paired(samples)
    process_cpu = cost.pop("cpu_ms_per_turn")
    summary["process_cpu_ms_per_round"] = {
        "current": process_cpu["current"],
        "baseline": process_cpu["baseline"],
        "current_over_baseline": harness.ratio(process_cpu["current"], process_cpu["baseline"]),
        "backend": process_cpu["backend"],
        "postgres": process_cpu.get("postgres"),
    }
    summary["load_average_before_after"] = [round(load_before[0], 2), round(os.getloadavg()[0], 2)]
    return summary | cost


# --- summaries -------------------------------------------------------------------------------------


def summarize(samples: list[Turn], window: int) -> dict[str, Any]:
    turns = len(samples)
    continued = [s for s in samples if s.turn >= 2]
    early = (2, 2 + window)
    late = (turns - window, turns)

    def medians(attribute: str) -> dict[str, Any]:
        first, last = _window(samples, *early, attribute), _window(samples, *late, attribute)
        return {
            "early_median": round(first, 3),
            "late_median": round(last, 3),
            "late_over_early": harness.ratio(last, first),
            **harness.describe([float(getattr(s, attribute)) for s in continued]),
        }

    return {
        "windows": {"early_turns": list(early), "late_turns": list(late)},
        "e2e_ms": medians("e2e_ms"),
        "overhead_ms": medians("overhead_ms"),
        "db_ms": medians("db_ms"),
        "backend_ms": medians("backend_ms"),
        "sql_statements": sorted({s.statements for s in continued}),
        "round_trips": sorted({s.round_trips for s in continued}),
        "bytes_sent": medians("bytes_sent"),
        "bytes_sent_at_depth_100": next((s.bytes_sent for s in samples if s.turn == 101), None),
        "tokens_rendered_total": sum(s.rendered_tokens or 0 for s in samples),
        "decisions": harness.decisions(samples),
        "errors": sum(1 for s in samples if s.error is not None),
    }


def summarize_probe(samples: Sequence[RoundTurn]) -> dict[str, Any]:
    """Deep over shallow per metric (see `summarize_rounds`)."""
    return summarize_rounds(samples, "deep", "shallow")


def summarize_paired(samples: Sequence[RoundTurn]) -> dict[str, Any]:
    """This checkout over the baseline per metric (see `summarize_rounds`)."""
    return summarize_rounds(samples, "current", "baseline")


def summarize_rounds(samples: Sequence[RoundTurn], first: str, second: str) -> dict[str, Any]:
    """The `first` side over the `second` per metric, from the rounds whose two turns both succeeded:
    each side's median and p99 and their ratios, and a 95% interval for the ratio of medians from
    resampling those rounds (how far the rounds' own sampling moves it). A metric a turn did not
    report (NaN) is left out."""
    rounds: dict[int, dict[bool, RoundTurn]] = {}
    for sample in samples:
        rounds.setdefault(sample.round, {})[sample.first] = sample
    pairs = [
        (both[True], both[False])
        for both in rounds.values()
        if len(both) == 2 and all(turn.sample.error is None for turn in both.values())
    ]
    summary: dict[str, Any] = {
        "rounds": len(pairs),
        "errors": sum(1 for sample in samples if sample.sample.error is not None),
    }
    if not pairs:
        return summary
    summary[f"{first}_turns"] = [pairs[0][0].sample.turn, pairs[-1][0].sample.turn]
    summary["decisions"] = {
        first: harness.decisions([one.sample for one, _ in pairs]),
        second: harness.decisions([other.sample for _, other in pairs]),
    }
    picker = random.Random(0)  # the same resamples for every metric and every run
    resamples = [[picker.randrange(len(pairs)) for _ in pairs] for _ in range(RESAMPLES)]
    for metric in ROUND_METRICS:
        ones = [one.value(metric) for one, _ in pairs]
        others = [other.value(metric) for _, other in pairs]
        if not any(math.isnan(value) for value in ones + others):
            summary[metric] = side_over_side(ones, others, resamples, first, second)
    return summary


def side_over_side(
    ones: Sequence[float],
    others: Sequence[float],
    resamples: Sequence[Sequence[int]],
    first: str,
    second: str,
) -> dict[str, Any]:
    """`ones[i]` (the `first` side) and `others[i]` were measured in the same round; `resamples` are
    lists of rounds."""
    one_median, other_median = statistics.median(ones), statistics.median(others)
    one_p99, other_p99 = harness.percentile(ones, 99), harness.percentile(others, 99)
    resampled = (_ratio_of_medians(ones, others, picks) for picks in resamples)
    ratios = [ratio for ratio in resampled if ratio is not None]
    return {
        f"{first}_median": round(one_median, 3),
        f"{second}_median": round(other_median, 3),
        f"median_{first}_over_{second}": harness.ratio(one_median, other_median),
        "median_ratio_95": (
            [round(harness.percentile(ratios, 2.5), 3), round(harness.percentile(ratios, 97.5), 3)]
            if ratios
            else None
        ),
        f"{first}_p99": round(one_p99, 3),
        f"{second}_p99": round(other_p99, 3),
        f"p99_{first}_over_{second}": harness.ratio(one_p99, other_p99),
    }


def _ratio_of_medians(ones: Sequence[float], others: Sequence[float], picks: Sequence[int]) -> float | None:
    return harness.ratio(
        statistics.median([ones[i] for i in picks]), statistics.median([others[i] for i in picks])
    )


def probe_table(per_pass: dict[str, dict[str, Any]]) -> list[str]:
    """The probes of a run as text lines: deep and shallow median / p99, and deep over shallow."""
    probes = {name: summary.get("probe", {}) for name, summary in per_pass.items()}
    return rounds_table("probe: pass", probes, "deep", "shallow")


def paired_table(paired_summaries: dict[str, dict[str, Any]]) -> list[str]:
    """The paired comparisons of a run as text lines, with each process's CPU per round."""
    lines = rounds_table("paired: mode/lineage", paired_summaries, "current", "baseline")
    for name, summary in paired_summaries.items():
        cpu = summary["process_cpu_ms_per_round"]
        lines.append(
            f"{name}: process CPU per round {cpu['current']} / {cpu['baseline']} ms,"
            f" current/baseline {cpu['current_over_baseline']};"
            f" other processes {summary['other_processes_cores']} cores,"
            f" load average {summary['load_average_before_after']}"
        )
    return lines


def rounds_table(heading: str, summaries: dict[str, dict[str, Any]], first: str, second: str) -> list[str]:
    """Interleaved rounds' summaries as text lines: each side's median / p99, and first over second
    (no lines when none has a round)."""
    if not any(found.get("rounds") for found in summaries.values()):
        return []
    lines = [
        f"{heading:<36} {'metric':<15} {first + ' med / p99':>17} {second + ' med / p99':>19}"
        f"   {first}/{second}: median [95%] / p99"
    ]
    for name, found in summaries.items():
        if found.get("rounds"):
            start, end = found[f"{first}_turns"]
            lines.append(f"{name} ({found['rounds']} rounds, {first} turns {start}-{end})")
        for metric in ROUND_METRICS:
            if figures := found.get(metric):
                interval = figures["median_ratio_95"] or [math.nan, math.nan]
                lines.append(
                    f"{'':<36} {metric:<15}"
                    f" {figures[f'{first}_median']:>8.2f} / {figures[f'{first}_p99']:<6.2f}"
                    f" {figures[f'{second}_median']:>10.2f} / {figures[f'{second}_p99']:<6.2f}"
                    f"   {figures[f'median_{first}_over_{second}']} [{interval[0]}-{interval[1]}]"
                    f" / {figures[f'p99_{first}_over_{second}']}"
                )
    return lines


def direct_floor(direct: Sequence[Turn]) -> dict[int, float]:
    """End-to-end time of the direct call at each depth, as a rolling median: a turn of another pass is
    set against the floor at its depth, not against one noisy direct sample."""
    smoothed = _rolling_median([s.e2e_ms for s in direct], SMOOTHING)
    return {s.turn: value for s, value in zip(direct, smoothed, strict=True)}


def over_direct(samples: Sequence[Turn], floor: dict[int, float]) -> dict[int, float]:
    """Per continued turn: its end-to-end time less the direct call's at the same depth."""
    return {
        s.turn: s.e2e_ms - floor[s.turn]
        for s in samples
        if s.turn >= 2 and s.turn in floor and s.error is None
    }


def summarize_over_direct(values: dict[int, float], turns: int, window: int) -> dict[str, Any]:
    def median_of(first: int, last: int) -> float:
        chosen = [v for turn, v in values.items() if first <= turn <= last]
        return round(statistics.median(chosen), 3) if chosen else float("nan")

    return {
        "early_median": median_of(2, 2 + window),
        "late_median": median_of(turns - window, turns),
        **harness.describe(list(values.values())),
    }


# What against_convstate sets side by side: where each figure is in a pass's summary.
_AGAINST = {
    "over_direct_median": ("over_direct_ms", "median"),
    "over_direct_p99": ("over_direct_ms", "p99"),
    "service_cpu_per_turn": ("cpu_ms_per_turn", "service"),
    "postgres_statements_per_turn": ("postgres_statements_per_turn",),
}


def against_convstate(per_pass: dict[str, dict[str, Any]], others: Sequence[str]) -> dict[str, Any]:
    """Each other server as a multiple of convstate, per lineage and convstate path: its overhead over
    the direct call (medians and p99; no ratio where convstate's is not above the floor, as a
    `cache_ref` turn's is not once the whole history costs the direct call more), its CPU per turn and
    the statements Postgres executed per turn (both where measured)."""
    out: dict[str, Any] = {}
    for other in others:
        for lineage in LINEAGES:
            theirs = per_pass.get(f"{other}/-/{lineage}")
            if not theirs:
                continue
            entry: dict[str, Any] = {}
            for mode in MODES:
                ours = per_pass.get(f"convstate/{mode}/{lineage}")
                if not ours:
                    continue
                for label, path in _AGAINST.items():
                    mine, yours = _lookup(theirs, path), _lookup(ours, path)
                    entry[f"{label}_over_convstate_{mode}"] = (
                        harness.ratio(mine, yours)
                        if mine is not None and yours is not None and yours > 0
                        else None
                    )
            out[f"{other}/{lineage}"] = entry
    return out


def _lookup(summary: dict[str, Any], path: Sequence[str]) -> float | None:
    value: Any = summary
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    return float(value) if isinstance(value, int | float) else None


def compare(per_pass: dict[str, dict[str, Any]], current: str, baseline: str | None) -> dict[str, Any]:
    """The acceptance ratios of the run (medians, and p99 where the issue asks for it)."""
    out: dict[str, Any] = {}
    for lineage in LINEAGES:
        cache = per_pass.get(f"{current}/cache_ref/{lineage}")
        full = per_pass.get(f"{current}/full/{lineage}")
        entry: dict[str, Any] = {}
        if cache:
            entry["cache_ref_round_trips"] = cache["round_trips"]
            entry["cache_ref_overhead_late_over_early"] = cache["overhead_ms"]["late_over_early"]
            if overhead := cache.get("probe", {}).get("overhead_ms"):
                entry["cache_ref_overhead_probe_deep_over_shallow"] = {
                    key: overhead[key]
                    for key in ("median_deep_over_shallow", "median_ratio_95", "p99_deep_over_shallow")
                }
        if full:
            entry["full_db_ms_late_over_early"] = full["db_ms"]["late_over_early"]
        if cache and baseline and (old := per_pass.get(f"{baseline}/cache_ref/{lineage}")):
            now_cpu = cache["cpu_ms_per_turn"].get("service")
            old_cpu = old["cpu_ms_per_turn"].get("service")
            entry["cache_ref_service_cpu_ms_per_turn"] = {"current": now_cpu, "baseline": old_cpu}
            entry["cache_ref_service_cpu_current_over_baseline"] = harness.ratio(now_cpu or 0, old_cpu or 0)
            entry["cache_ref_overhead_median_current_over_baseline"] = harness.ratio(
                cache["overhead_ms"]["median"], old["overhead_ms"]["median"]
            )
            entry["cache_ref_overhead_p99_current_over_baseline"] = harness.ratio(
                cache["overhead_ms"]["p99"], old["overhead_ms"]["p99"]
            )
        if entry:
            out[lineage] = entry
    return out


def side_by_side(per_pass: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """End-to-end time per turn of every pass, early and late in the conversation: on the same backend,
    the difference between two targets is what each adds."""
    return [
        {
            "pass": name,
            "e2e_ms_early_median": summary["e2e_ms"]["early_median"],
            "e2e_ms_late_median": summary["e2e_ms"]["late_median"],
            "e2e_ms_p99": summary["e2e_ms"].get("p99"),
            "over_direct_ms_median": summary.get("over_direct_ms", {}).get("median"),
            "over_direct_ms_p99": summary.get("over_direct_ms", {}).get("p99"),
            "bytes_sent_late_median": summary["bytes_sent"]["late_median"],
            "service_cpu_ms_per_turn": summary["cpu_ms_per_turn"].get("service"),
            "load_average_before_after": summary["load_average_before_after"],
            "other_processes_cores": summary["other_processes_cores"],
        }
        for name, summary in per_pass.items()
    ]


def plot(results: dict[str, list[Turn]], path: Path) -> None:
    floor = direct_floor(results[DIRECT]) if DIRECT in results else None
    rows = 4 if floor else 3
    fig, axes = plt.subplots(rows, 1, figsize=(10, 4 * rows), sharex=True)
    ax_e2e, ax_overhead, ax_db = axes[0], axes[-2], axes[-1]
    for name, samples in results.items():
        depth = [s.turn - 1 for s in samples]
        style = "--" if "/full/" in name or name.startswith("direct") else "-"
        ax_e2e.plot(depth, _rolling_median([s.e2e_ms for s in samples], SMOOTHING), style, label=name)
        if floor and name != DIRECT and (values := over_direct(samples, floor)):
            turns = sorted(values)
            smoothed = _rolling_median([values[turn] for turn in turns], SMOOTHING)
            axes[1].plot([turn - 1 for turn in turns], smoothed, style, label=name)
        if any(s.statements for s in samples):
            overhead = _rolling_median([s.overhead_ms for s in samples], SMOOTHING)
            ax_overhead.plot(depth, overhead, style, label=name)
            ax_db.plot(depth, _rolling_median([s.db_ms for s in samples], SMOOTHING), style, label=name)
    ax_e2e.set_ylabel("end-to-end per turn (ms)")
    ax_e2e.set_yscale("log")
    if floor:
        axes[1].set_ylabel("end-to-end over the direct call\nat the same depth (ms)")
        # Negative where a server's backend call is cheaper than the whole history sent directly.
        axes[1].set_yscale("symlog", linthresh=10)
    ax_overhead.set_ylabel("service overhead (ms)\n(Server-Timing total - backend)")
    ax_overhead.set_ylim(bottom=0)
    ax_db.set_ylabel("database time (ms)")
    ax_db.set_ylim(bottom=0)
    ax_db.set_xlabel("conversation depth (turns before this one); rolling medians of 9 turns")
    for axis in axes:
        axis.grid(True, alpha=0.3)
        axis.legend(loc="upper left", fontsize=7)
    fig.suptitle("per-turn cost against depth (sequential turns, one run, same reference backend)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _rolling_median(values: Sequence[float], width: int) -> list[float]:
    half = width // 2
    return [statistics.median(values[max(0, i - half) : i + half + 1]) for i in range(len(values))]


# --- main ------------------------------------------------------------------------------------------


@contextmanager
def checkout(revision: str) -> Iterator[Path]:
    """The service and migrations of `revision`, from `git archive`, in a temporary directory."""
    with tempfile.TemporaryDirectory(prefix="convstate-baseline-") as directory:
        archive = subprocess.run(
            ["git", "archive", "--format=tar", revision, "service", "migrations", "alembic.ini"],
            cwd=ROOT,
            capture_output=True,
            check=True,
        ).stdout
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(directory, filter="data")
        yield Path(directory)


def _passes(
    modes: Sequence[str], lineages: Sequence[str], targets: Sequence[Target], direct: bool
) -> list[Pass]:
    """convstate's passes with the baseline's right after each (the same machine state), then the other
    servers', then the backend called directly (a lineage of its own: the client's history)."""
    passes = [
        Pass(target, mode, lineage)
        for lineage in lineages
        for mode in modes
        for target in targets
        if target.convstate
    ]
    passes += [Pass(target, "-", lineage) for lineage in lineages for target in targets if target.url]
    if direct:
        passes.append(Pass(Target("direct", direct=True), "-", "client-history"))
    return passes


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--turns", type=int, default=200, help="turns in each measured conversation")
    parser.add_argument("--modes", default=",".join(MODES), help="comma list of backend modes")
    parser.add_argument("--lineages", default="chain", help="comma list of chain, conversation")
    parser.add_argument("--baseline", help="a git revision of convstate to measure beside this checkout")
    parser.add_argument("--direct", action="store_true", help="also the backend called with the full history")
    parser.add_argument(
        "--target",
        action="append",
        default=[],
        metavar="NAME=URL",
        help="another Responses server (with /v1)",
    )
    parser.add_argument(
        "--target-model",
        default=harness.MODEL,
        help="the reference backend's model as the --target servers name it",
    )
    parser.add_argument(
        "--target-pid",
        action="append",
        default=[],
        metavar="NAME=PID",
        help="a --target server's process, for its CPU per turn",
    )
    parser.add_argument(
        "--target-database",
        action="append",
        default=[],
        metavar="NAME=DATABASE",
        help="a --target server's database on this run's Postgres, for the statements it executes",
    )
    parser.add_argument("--backend-port", type=int, help="the reference backend's port (for --target)")
    parser.add_argument(
        "--probe-rounds",
        type=int,
        default=PROBE_ROUNDS,
        metavar="K",
        help="rounds of the interleaved deep/shallow probe after each pass (0: no probe)",
    )
    parser.add_argument(
        "--paired-rounds",
        type=int,
        default=PAIRED_ROUNDS,
        metavar="K",
        help="with --baseline: rounds of the paired comparison, both revisions at once (0: none)",
    )
    parser.add_argument(
        "--prefill-us",
        type=float,
        default=0.0,
        help="the reference backend's simulated prefill, µs per prompt token not in its prefix cache",
    )
    parser.add_argument("--max-output-tokens", type=int, default=48)
    parser.add_argument("--profile", action="store_true", help="record the service with py-spy")
    parser.add_argument("--quiet-wait", type=float, default=120.0, help="seconds to wait for a quiet machine")
    parser.add_argument("--name", default=NAME, help="results file name")
    args = parser.parse_args(argv)
    if args.turns < 20:
        parser.error("--turns must be at least 20 (early and late windows)")
    if args.probe_rounds < 0:
        parser.error("--probe-rounds must be 0 (no probe) or more")
    if args.paired_rounds < 0:
        parser.error("--paired-rounds must be 0 (no paired comparison) or more")
    modes = [mode.strip() for mode in args.modes.split(",") if mode.strip()]
    lineages = [lineage.strip() for lineage in args.lineages.split(",") if lineage.strip()]
    if not set(lineages) <= set(LINEAGES):
        parser.error(f"--lineages: {LINEAGES}")
    window = max(3, args.turns // 20)

    with contextmanager_or_none(args.baseline) as baseline_source:
        targets = [Target("convstate")]
        if baseline_source is not None:
            targets.append(Target(f"baseline@{args.baseline}", source=baseline_source))
        pids = _named(parser, "--target-pid", args.target_pid)
        databases = _named(parser, "--target-database", args.target_database)
        for name, url in _named(parser, "--target", args.target).items():
            pid = pids.pop(name, None)
            if pid is not None and not pid.isdigit():
                parser.error(f"--target-pid {name}: not a process id: {pid!r}")
            targets.append(
                Target(
                    name,
                    url=url,
                    model=args.target_model,
                    pid=int(pid) if pid else None,
                    database=databases.pop(name, None),
                )
            )
        if pids or databases:
            parser.error(f"--target-pid/--target-database name no --target: {sorted({*pids, *databases})}")
        passes = _passes(modes, lineages, targets, args.direct)
        paired_runs = (
            [(mode, lineage) for lineage in lineages for mode in modes]
            if baseline_source is not None and args.paired_rounds
            else []
        )
        results, costs = run(passes, paired_runs, baseline_source, args)

    per_pass = {name: {**summarize(samples, window), **costs[name]} for name, samples in results.items()}
    if DIRECT in results:
        floor = direct_floor(results[DIRECT])
        for name, samples in results.items():
            if name != DIRECT:
                values = over_direct(samples, floor)
                per_pass[name]["over_direct_ms"] = summarize_over_direct(values, len(samples), window)
    baseline_name = next((t.name for t in targets if t.source is not None), None)
    comparison = compare(per_pass, "convstate", baseline_name)
    paired_summaries: dict[str, dict[str, Any]] = costs.pop("paired")
    for name, paired_summary in paired_summaries.items():
        mode, lineage = name.split("/")
        comparison.setdefault(lineage, {})[f"{mode}_paired_against_baseline"] = paired_summary
    figure = harness.RESULTS / f"{args.name}.png"
    plot(results, figure)
    summary: dict[str, Any] = {
        "benchmark": NAME,
        "turns": args.turns,
        "max_output_tokens": args.max_output_tokens,
        "prefill_us_per_token": args.prefill_us,
        "machine": costs.pop("machine"),
        "passes": per_pass,
        "comparison": comparison,
        "over_direct_against_convstate": against_convstate(per_pass, [t.name for t in targets if t.url]),
        "side_by_side": side_by_side(per_pass),
        "plot": str(figure.relative_to(ROOT)),
    }
    harness.write_result(args.name, summary, results)
    for line in probe_table(per_pass) + paired_table(paired_summaries):
        harness.log(line)


def _named(parser: argparse.ArgumentParser, option: str, specs: Sequence[str]) -> dict[str, str]:
    """`NAME=VALUE` options -> {name: value}."""
    named: dict[str, str] = {}
    for spec in specs:
        name, _, value = spec.partition("=")
        if not name or not value:
            parser.error(f"{option} expects NAME=VALUE, got {spec!r}")
        named[name] = value
    return named


@contextmanager
def contextmanager_or_none(revision: str | None) -> Iterator[Path | None]:
    if revision is None:
        yield None
        return
    with checkout(revision) as source:
        yield source


def run(
    passes: Sequence[Pass],
    paired_runs: Sequence[tuple[str, str]],
    baseline_source: Path | None,
    args: argparse.Namespace,
) -> tuple[dict[str, list[Turn]], dict[str, Any]]:
    """The passes, then the paired comparisons (mode, lineage) against the baseline at `baseline_source`
    (its summaries under `paired` in the costs)."""
    results: dict[str, list[Turn]] = {}
    costs: dict[str, Any] = {"paired": {}}
    harness.RESULTS.mkdir(parents=True, exist_ok=True)
    with (
        harness.postgres_server() as server,
        harness.start_backend(port=args.backend_port, prefill_us_per_token=args.prefill_us) as backend,
    ):
        harness.log(f"reference backend at {backend.url}")
        costs["machine"] = harness.machine(server) | {"reference_backend": backend.url}
        postmaster = harness.postmaster_pid(server)
        for run_ in passes:
            harness.log(f"{run_.name}: {args.turns} turns")
            busy = harness.wait_for_quiet(args.quiet_wait)
            profile_path = (
                harness.RESULTS / f"{args.name}-{run_.name.replace('/', '-')}.pyspy.txt"
                if args.profile and run_.target.convstate
                else None
            )
            results[run_.name], cost = run_pass(
                run_,
                server,
                backend,
                args.turns,
                args.probe_rounds,
                args.max_output_tokens,
                profile_path,
                postmaster,
            )
            costs[run_.name] = {"machine_busy_percent_before": busy, **cost}
        for mode, lineage in paired_runs:
            assert baseline_source is not None
            harness.log(f"paired {mode}/{lineage}: {args.turns} turns each, then {args.paired_rounds} rounds")
            busy = harness.wait_for_quiet(args.quiet_wait)
            costs["paired"][f"{mode}/{lineage}"] = {"machine_busy_percent_before": busy} | run_paired(
                mode,
                lineage,
                baseline_source,
                server,
                backend,
                args.turns,
                args.paired_rounds,
                args.max_output_tokens,
                postmaster,
            )
    return results, costs


if __name__ == "__main__":
    main()
