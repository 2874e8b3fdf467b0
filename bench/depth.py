"""Per-turn cost against conversation depth: one conversation of N turns in each backend mode.

    python -m bench.depth [--turns 200] [--modes full,cache_ref]

For every turn it records the service overhead (Server-Timing total - backend), SQL statements, bytes
posted to the backend, prompt tokens the backend had to render (delta of its /stats tokens_rendered),
and the decision. The service, the reference backend and Postgres each run in their own process; turns
are sequential, through the official openai SDK, so nothing else competes for the CPU.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import openai

from bench import harness, profile
from bench.harness import Turn

NAME = "depth"
MODES = ("full", "cache_ref")
WARMUP_TURNS = 5  # a separate conversation first, so statement compilation and pool growth are not measured


def _window(samples: Sequence[Turn], first: int, last: int, attribute: str) -> float:
    values = [float(getattr(s, attribute)) for s in samples if first <= s.turn <= last]
    return statistics.median(values) if values else float("nan")


def run_mode(
    database_url: str,
    mode: str,
    turns: int,
    max_output_tokens: int,
    record_profile: Path | None,
    postmaster: int | None,
) -> tuple[list[Turn], dict[str, Any]]:
    """The samples of one conversation, and the CPU the processes spent on it."""
    with (
        harness.start_backend() as backend,
        harness.start_service(database_url, backend.url, mode) as service,
    ):
        client = openai.OpenAI(
            base_url=f"{service.url}/v1", api_key=service.api_key, max_retries=0, timeout=120
        )

        def one(conversation: int, turn: int, previous: str | None) -> tuple[Turn, str]:
            start = time.perf_counter()
            raw = client.responses.with_raw_response.create(
                model=harness.MODEL,
                instructions=harness.INSTRUCTIONS,
                input=harness.turn_text(conversation, turn),
                previous_response_id=previous,
                max_output_tokens=max_output_tokens,
            )
            response = raw.parse()
            elapsed = (time.perf_counter() - start) * 1000
            sample = harness.measured_turn(conversation, turn, 0.0, elapsed, raw.status_code, raw.headers)
            return sample, response.id

        previous: str | None = None
        for turn in range(1, WARMUP_TURNS + 1):
            _, previous = one(0, turn, previous)

        samples: list[Turn] = []
        previous = None
        before = harness.backend_stats(backend.url)["tokens_rendered"]
        recorder = profile.Recorder(service.pid, record_profile) if record_profile else None
        meter = harness.CpuMeter({"service": service.pid, "backend": backend.pid}, postmaster)
        for turn in range(1, turns + 1):
            sample, previous = one(1, turn, previous)
            after = harness.backend_stats(backend.url)["tokens_rendered"]
            sample.rendered_tokens = after - before
            samples.append(sample)
            before = after
            if turn % 50 == 0:
                harness.log(f"{mode}: turn {turn}/{turns}, overhead {sample.overhead_ms:.2f} ms")
        cpu = meter.stop(len(samples))
        if recorder is not None:
            recorder.stop()
        return samples, cpu


def _rendered(samples: Sequence[Turn], first: int, last: int) -> float:
    return statistics.median(s.rendered_tokens or 0 for s in samples if first <= s.turn <= last)


def summarize_mode(samples: list[Turn], window: int) -> dict[str, Any]:
    turns = len(samples)
    continued = [s for s in samples if s.turn >= 2]
    late_first = turns - window
    early = (2, 2 + window)
    late = (late_first, turns)
    overhead_early = _window(samples, *early, "overhead_ms")
    overhead_late = _window(samples, *late, "overhead_ms")
    bytes_early = _window(samples, *early, "bytes_sent")
    bytes_late = _window(samples, *late, "bytes_sent")
    rendered_early = _rendered(samples, *early)
    rendered_late = _rendered(samples, *late)
    return {
        "windows": {"early_turns": list(early), "late_turns": list(late)},
        "overhead_ms": harness.describe([s.overhead_ms for s in continued]),
        "overhead_ms_early_median": round(overhead_early, 3),
        "overhead_ms_late_median": round(overhead_late, 3),
        "overhead_late_over_early": harness.ratio(overhead_late, overhead_early),
        "db_ms": harness.describe([s.db_ms for s in continued]),
        "e2e_ms": harness.describe([s.e2e_ms for s in continued]),
        "e2e_ms_early_median": round(_window(samples, *early, "e2e_ms"), 3),
        "e2e_ms_late_median": round(_window(samples, *late, "e2e_ms"), 3),
        "backend_ms_early_median": round(_window(samples, *early, "backend_ms"), 3),
        "backend_ms_late_median": round(_window(samples, *late, "backend_ms"), 3),
        "sql_statements": sorted({s.statements for s in continued}),
        "bytes_sent_early_median": bytes_early,
        "bytes_sent_late_median": bytes_late,
        "bytes_sent_at_depth_100": next((s.bytes_sent for s in samples if s.turn == 101), None),
        "bytes_late_over_early": harness.ratio(bytes_late, bytes_early),
        "tokens_rendered_early_median": rendered_early,
        "tokens_rendered_late_median": rendered_late,
        "tokens_rendered_total": sum(s.rendered_tokens or 0 for s in samples),
        "decisions": harness.decisions(samples),
        "errors": sum(1 for s in samples if s.error is not None),
    }


def plot(results: dict[str, list[Turn]], path: str) -> None:
    fig, (ax_overhead, ax_bytes, ax_tokens) = plt.subplots(3, 1, figsize=(9, 10), sharex=True)
    colors = {"full": "tab:red", "cache_ref": "tab:blue"}
    for mode, samples in results.items():
        depth = [s.turn - 1 for s in samples]
        color = colors.get(mode)
        ax_overhead.plot(depth, [s.overhead_ms for s in samples], ".", ms=3, color=color, alpha=0.5)
        rolling = _rolling_median([s.overhead_ms for s in samples], 9)
        ax_overhead.plot(depth, rolling, "-", color=color, label=f"{mode} (rolling median of 9)")
        ax_bytes.plot(depth, [s.bytes_sent for s in samples], "-", color=color, label=mode)
        rendered = [max(s.rendered_tokens or 0, 1) for s in samples]
        ax_tokens.plot(depth, rendered, "-", color=color, label=mode)
    ax_overhead.set_ylabel("service overhead (ms)\n(Server-Timing total - backend)")
    ax_overhead.set_ylim(bottom=0)
    ax_bytes.set_ylabel("bytes posted to the backend")
    ax_bytes.set_yscale("log")
    ax_tokens.set_ylabel("prompt tokens the backend rendered")
    ax_tokens.set_yscale("log")
    ax_tokens.set_xlabel("conversation depth (turns before this one)")
    for axis in (ax_overhead, ax_bytes, ax_tokens):
        axis.grid(True, alpha=0.3)
        axis.legend(loc="upper left")
    fig.suptitle("convstate: per-turn cost against depth (one conversation, sequential turns, Postgres)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _rolling_median(values: Sequence[float], width: int) -> list[float]:
    half = width // 2
    return [statistics.median(values[max(0, i - half) : i + half + 1]) for i in range(len(values))]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--turns", type=int, default=200, help="turns in the measured conversation")
    parser.add_argument("--modes", default=",".join(MODES), help="comma list of backend modes")
    parser.add_argument("--max-output-tokens", type=int, default=48)
    parser.add_argument("--profile", action="store_true", help="record the service with py-spy")
    parser.add_argument("--quiet-wait", type=float, default=120.0, help="seconds to wait for a quiet machine")
    args = parser.parse_args(argv)
    if args.turns < 20:
        parser.error("--turns must be at least 20 (early and late windows)")
    modes = [mode.strip() for mode in args.modes.split(",") if mode.strip()]
    window = max(3, args.turns // 20)

    results: dict[str, list[Turn]] = {}
    busy: dict[str, float] = {}
    cpu: dict[str, dict[str, Any]] = {}
    harness.RESULTS.mkdir(parents=True, exist_ok=True)
    with harness.postgres_server() as server:
        machine = harness.machine(server)
        postmaster = harness.postmaster_pid(server)
        for mode in modes:
            harness.log(f"{mode}: {args.turns} turns")
            busy[mode] = harness.wait_for_quiet(args.quiet_wait)
            profile_path = harness.RESULTS / f"{NAME}-{mode}.pyspy.txt" if args.profile else None
            with harness.fresh_database(server) as database_url:
                results[mode], cpu[mode] = run_mode(
                    database_url, mode, args.turns, args.max_output_tokens, profile_path, postmaster
                )

    per_mode = {mode: {**summarize_mode(samples, window), **cpu[mode]} for mode, samples in results.items()}
    summary: dict[str, Any] = {
        "benchmark": NAME,
        "turns": args.turns,
        "max_output_tokens": args.max_output_tokens,
        "machine": machine,
        "machine_busy_percent_before": busy,
        "modes": per_mode,
    }
    if "full" in per_mode and "cache_ref" in per_mode:
        full, cache = per_mode["full"], per_mode["cache_ref"]
        summary["comparison"] = {
            "bytes_full_over_cache_ref_at_depth_100": harness.ratio(
                full["bytes_sent_at_depth_100"] or 0, cache["bytes_sent_at_depth_100"] or 0
            ),
            "bytes_full_over_cache_ref_late": harness.ratio(
                full["bytes_sent_late_median"], cache["bytes_sent_late_median"]
            ),
            "tokens_rendered_full_over_cache_ref_late": harness.ratio(
                full["tokens_rendered_late_median"], cache["tokens_rendered_late_median"]
            ),
            "overhead_cache_ref_over_full_late": harness.ratio(
                cache["overhead_ms_late_median"], full["overhead_ms_late_median"]
            ),
            "e2e_cache_ref_over_full_late": harness.ratio(
                cache["e2e_ms_late_median"], full["e2e_ms_late_median"]
            ),
        }
    if "cache_ref" in per_mode:
        cache = per_mode["cache_ref"]
        bytes_ratio = summary.get("comparison", {}).get("bytes_full_over_cache_ref_at_depth_100")
        summary["targets"] = {
            "cache_ref_overhead_late_within_1.3x_of_early": (cache["overhead_late_over_early"] or 99) <= 1.3,
            "bytes_full_over_cache_ref_at_depth_100_at_least_20x": bytes_ratio is not None
            and bytes_ratio >= 20,
        }
    harness.RESULTS.mkdir(parents=True, exist_ok=True)
    figure = harness.RESULTS / f"{NAME}.png"
    plot(results, str(figure))
    summary["plot"] = str(figure.relative_to(harness.RESULTS.parent.parent))
    harness.write_result(NAME, summary, results)


if __name__ == "__main__":
    main()
