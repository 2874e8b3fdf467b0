"""Memory over a long run: many turns through one service process, its RSS sampled as they go.

    python -m bench.soak [--turns 10000] [--conversations 100] [--concurrency 32] [--mode cache_ref]

RSS is VmRSS from /proc/<pid>/status of the `convstate serve` process. The figure that matters is the
growth over the second half of the run: a process that only warms up (pools, caches, allocator arenas)
levels off; a leak keeps growing with the number of turns.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from bench import harness
from bench.harness import Turn

NAME = "soak"
SAMPLE_SECONDS = 0.25


@dataclass(frozen=True, slots=True)
class RssSample:
    seconds: float
    turns: int
    service_kib: int
    backend_kib: int


def _around(samples: Sequence[RssSample], turns: float, spread: float) -> float:
    """Median service RSS of the samples within `spread` turns of `turns` (noise from the allocator)."""
    near = [s.service_kib for s in samples if abs(s.turns - turns) <= spread]
    if not near:
        near = [min(samples, key=lambda s: abs(s.turns - turns)).service_kib]
    return float(statistics.median(near))


async def soak(
    service: harness.Process, backend: harness.Process, *, turns: int, conversations: int, concurrency: int
) -> tuple[harness.DriveResult, list[RssSample]]:
    completed = 0
    samples: list[RssSample] = []
    origin = time.perf_counter()

    def count(_: Turn) -> None:
        nonlocal completed
        completed += 1

    async def sampler() -> None:
        while True:
            samples.append(
                RssSample(
                    round(time.perf_counter() - origin, 3),
                    completed,
                    harness.rss_kib(service.pid) or 0,
                    harness.rss_kib(backend.pid) or 0,
                )
            )
            await asyncio.sleep(SAMPLE_SECONDS)

    task = asyncio.create_task(sampler())
    try:
        result = await harness.drive(
            service.url,
            api_key=service.api_key,
            conversations=conversations,
            turns=turns // conversations,
            concurrency=concurrency,
            on_turn=count,
        )
    finally:
        task.cancel()
    samples.append(
        RssSample(
            round(time.perf_counter() - origin, 3),
            completed,
            harness.rss_kib(service.pid) or 0,
            harness.rss_kib(backend.pid) or 0,
        )
    )
    return result, samples


def plot(samples: Sequence[RssSample], path: str, title: str) -> None:
    fig, ax = plt.subplots(figsize=(9, 4.5))
    ax.plot(
        [s.turns for s in samples],
        [s.service_kib / 1024 for s in samples],
        "-",
        label="service (convstate serve)",
    )
    total = samples[-1].turns
    ax.axvline(total / 2, color="grey", ls=":", label="second half starts")
    ax.set_xlabel("turns completed")
    ax.set_ylabel("RSS (MiB)")
    ax.set_ylim(bottom=0)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--turns", type=int, default=10_000, help="total turns (spread over the conversations)"
    )
    parser.add_argument("--conversations", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight at once")
    parser.add_argument("--mode", default="cache_ref", choices=("full", "cache_ref", "affinity"))
    parser.add_argument(
        "--set", action="append", default=[], metavar="NAME=VALUE", help="a service setting; repeatable"
    )
    parser.add_argument("--quiet-wait", type=float, default=120.0, help="seconds to wait for a quiet machine")
    parser.add_argument("--name", default=NAME, help="results file name (bench/results/<name>.json)")
    args = parser.parse_args(argv)
    if args.turns < args.conversations * 2:
        parser.error("--turns must be at least twice --conversations")
    service_settings = harness.parse_settings(parser, args.set)

    with harness.postgres_server() as server:
        machine = harness.machine(server)
        postmaster = harness.postmaster_pid(server)
        with (
            harness.fresh_database(server) as database_url,
            harness.start_backend() as backend,
            harness.start_service(database_url, backend.url, args.mode, **service_settings) as service,
        ):
            busy_before = harness.wait_for_quiet(args.quiet_wait)
            harness.log(f"{args.turns} turns over {args.conversations} conversations, mode {args.mode}")
            meter = harness.CpuMeter({"service": service.pid, "backend": backend.pid}, postmaster)
            result, samples = asyncio.run(
                soak(
                    service,
                    backend,
                    turns=args.turns,
                    conversations=args.conversations,
                    concurrency=args.concurrency,
                )
            )
            done = [t for t in result.turns if t.error is None]
            cpu = meter.stop(len(done))

    total = samples[-1].turns
    spread = max(total * 0.02, 1)
    start = _around(samples, spread, spread)
    middle = _around(samples, total / 2, spread)
    end = _around(samples, total - spread, spread)
    second_half = 100 * (end - middle) / middle
    first_half = 100 * (middle - start) / start
    summary: dict[str, Any] = {
        "benchmark": NAME,
        "machine": machine,
        "mode": args.mode,
        "service_settings": service_settings,
        "turns_requested": args.turns,
        "turns_completed": len(done),
        "conversations": args.conversations,
        "concurrency": args.concurrency,
        "errors": len(result.turns) - len(done),
        "wall_seconds": round(result.wall_seconds, 1),
        "throughput_turns_per_s": round(len(done) / result.wall_seconds, 1),
        "rss_mib": {
            "after_2_percent": round(start / 1024, 1),
            "at_half": round(middle / 1024, 1),
            "at_end": round(end / 1024, 1),
            "max": round(max(s.service_kib for s in samples) / 1024, 1),
        },
        "rss_growth_first_half_percent": round(first_half, 2),
        "rss_growth_second_half_percent": round(second_half, 2),
        "levels_off": abs(second_half) <= 10.0,
        "backend_rss_mib_at_end": round(samples[-1].backend_kib / 1024, 1),
        "overhead_ms": harness.describe([t.overhead_ms for t in done]),
        "e2e_ms": harness.describe([t.e2e_ms for t in done]),
        "decisions": harness.decisions(result.turns),
        "machine_busy_percent_before": busy_before,
        **cpu,
    }
    harness.RESULTS.mkdir(parents=True, exist_ok=True)
    figure = harness.RESULTS / f"{args.name}.png"
    title = (
        f"service RSS over {total} turns ({args.conversations} conversations, {args.mode}): "
        f"second half {second_half:+.1f}%"
    )
    plot(samples, str(figure), title)
    summary["plot"] = str(figure.relative_to(harness.RESULTS.parent.parent))
    (harness.RESULTS / f"{args.name}.rss.json").write_text(json.dumps([asdict(s) for s in samples]))
    harness.write_result(args.name, summary, {args.mode: result.turns})


if __name__ == "__main__":
    main()
