"""KV-affine routing, measured: conversations through convstate to several reference-backend replicas
behind a router that behaves as llm-d's session-affinity scorer (service/backends/reference/router.py).

    python -m bench.affinity [--replicas 2] [--conversations 8] [--turns 12] [--prefill-us 200]

Configurations, each on a fresh database and fresh replicas:

- `round_robin`: the service in `full` mode, the router sending each request to the next replica
  (load-only routing, what a plain Service or a scheduler without session affinity does);
- `affinity`: the service in `affinity` mode (it sends back each lineage's llm-d session token), the
  router honouring it (llm-d's session-affinity scorer, least-loaded for requests without one);
- `cache_ref`: the service in `cache_ref` mode against one replica, no router: the handle path (only the
  new messages are sent and rendered), the best one process can do.

Each replica sleeps `--prefill-us` microseconds per prompt token it did not find in its prefix cache (its
simulated prefill; vLLM's automatic prefix caching over 16-token blocks). The configurations run at the
same time (on a shared machine, whatever else loads it loads all three alike), each with its
conversations concurrent and each conversation's turns one after the other. Per turn: the replica that
served it (the router's log by `x-request-id`), the cached prompt tokens the backend reported, the
simulated prefill that cost, and the latency the client saw. A continuation turn *stays* when it ran on
the replica that served its parent, the one that holds its prefix's KV.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import openai

from bench import harness
from service.backends.reference.router import Policy, create_router
from service.serving import ServerThread

NAME = "affinity"
CONFIGS = ("round_robin", "affinity", "cache_ref")
MODES = {"round_robin": "full", "affinity": "affinity", "cache_ref": "cache_ref"}
COLORS = {"round_robin": "tab:red", "affinity": "tab:green", "cache_ref": "tab:blue"}


@dataclass(slots=True)
class Sample:
    config: str
    conversation: int
    turn: int
    e2e_ms: float
    input_tokens: int
    cached_tokens: int
    decision: str
    prefill_ms: float  # the replica's simulated prefill: its uncached prompt tokens x --prefill-us
    replica: str = ""


@contextmanager
def backends(config: str, replicas: int, prefill_us: float) -> Iterator[tuple[str, str | None]]:
    """(the URL the service talks to, the router's URL or None)."""
    count = 1 if config == "cache_ref" else replicas
    started = [harness.start_backend(prefill_us_per_token=prefill_us) for _ in range(count)]
    try:
        if config == "cache_ref":
            yield started[0].url, None
            return
        policy: Policy = "round_robin" if config == "round_robin" else "session"
        names = [(f"bench/replica-{i}", backend.url) for i, backend in enumerate(started)]
        with ServerThread(create_router(names, policy)) as router:
            yield router.url, router.url
    finally:
        for backend in started:
            backend.stop()


async def drive(config: str, service_url: str, api_key: str, args: argparse.Namespace) -> list[Sample]:
    client = openai.AsyncOpenAI(base_url=f"{service_url}/v1", api_key=api_key, max_retries=0, timeout=300)
    samples: list[Sample] = []

    async def conversation(index: int) -> None:
        previous: str | None = None
        for turn in range(1, args.turns + 1):
            started = time.perf_counter()
            raw = await client.responses.with_raw_response.create(
                model=harness.MODEL,
                instructions=harness.INSTRUCTIONS,
                input=harness.turn_text(index, turn, args.words),
                previous_response_id=previous,
                max_output_tokens=args.max_output_tokens,
                extra_headers={"x-request-id": f"{config}-c{index}-t{turn}"},
            )
            elapsed = (time.perf_counter() - started) * 1000
            response = raw.parse()
            usage = response.usage
            assert usage is not None
            samples.append(
                Sample(
                    config,
                    index,
                    turn,
                    elapsed,
                    usage.input_tokens,
                    usage.input_tokens_details.cached_tokens,
                    raw.headers.get("x-convstate-decision", ""),
                    (usage.input_tokens - usage.input_tokens_details.cached_tokens) * args.prefill_us / 1000,
                )
            )
            previous = response.id

    try:
        await asyncio.gather(*(conversation(i) for i in range(args.conversations)))
    finally:
        await client.close()
    return samples


@dataclass(slots=True)
class Stack:
    """One configuration's running processes: the service and, with replicas, the router."""

    config: str
    service_url: str
    api_key: str
    router_url: str | None


def start(stack: ExitStack, server: str, config: str, args: argparse.Namespace) -> Stack:
    database_url = stack.enter_context(harness.fresh_database(server))
    backend_url, router_url = stack.enter_context(backends(config, args.replicas, args.prefill_us))
    service = stack.enter_context(harness.start_service(database_url, backend_url, MODES[config]))
    return Stack(config, service.url, service.api_key, router_url)


def run_config(running: Stack, args: argparse.Namespace) -> tuple[list[Sample], dict[str, Any]]:
    config = running.config
    samples = asyncio.run(drive(config, running.service_url, running.api_key, args))
    routed = {}
    if running.router_url is not None:
        log = httpx.get(f"{running.router_url}/router/log").json()
        routed = {row["request_id"]: row["replica"] for row in log}
    for sample in samples:
        sample.replica = routed.get(f"{config}-c{sample.conversation}-t{sample.turn}", "the only replica")
    return samples, summarize(samples)


def summarize(samples: Sequence[Sample]) -> dict[str, Any]:
    by_turn = {(s.conversation, s.turn): s for s in samples}
    continued = [s for s in samples if s.turn > 1]
    stayed = [s for s in continued if s.replica == by_turn[(s.conversation, s.turn - 1)].replica]
    cached = [s.cached_tokens / s.input_tokens for s in continued if s.input_tokens]
    return {
        "continuation_turns": len(continued),
        "stayed_on_prefix_replica": len(stayed),
        "continuation_hit_rate": round(len(stayed) / len(continued), 4) if continued else None,
        "cached_fraction_mean": round(statistics.fmean(cached), 4) if cached else None,
        "e2e_ms": harness.describe([s.e2e_ms for s in continued]),
        "simulated_prefill_ms": harness.describe([s.prefill_ms for s in continued]),
        "e2e_ms_first_turn": harness.describe([s.e2e_ms for s in samples if s.turn == 1]),
        "requests_per_replica": {
            r: sum(1 for s in samples if s.replica == r) for r in sorted({s.replica for s in samples})
        },
        "decisions": dict(
            sorted({s.decision: sum(1 for x in samples if x.decision == s.decision) for s in samples}.items())
        ),
    }


def plot(
    results: dict[str, list[Sample]], summaries: dict[str, dict[str, Any]], replicas: int, path: str
) -> None:
    fig, (ax_rate, ax_latency) = plt.subplots(1, 2, figsize=(12, 4.8))
    configs = list(results)
    rates = [100 * (summaries[c]["continuation_hit_rate"] or 0) for c in configs]
    cached = [100 * (summaries[c]["cached_fraction_mean"] or 0) for c in configs]
    x = range(len(configs))
    ax_rate.bar([i - 0.2 for i in x], rates, 0.4, label="continuation turns on their prefix's replica")
    ax_rate.bar([i + 0.2 for i in x], cached, 0.4, label="prompt tokens found in the prefix cache")
    ax_rate.axhline(100 / replicas, color="gray", ls=":", label=f"1/N (N = {replicas} replicas)")
    ax_rate.set_xticks(list(x), configs)
    ax_rate.set_ylabel("% of continuation turns / of prompt tokens")
    ax_rate.set_ylim(0, 105)
    ax_rate.legend(loc="lower right", fontsize=8)
    for config, samples in results.items():
        turns = sorted({s.turn for s in samples})
        e2e = [statistics.fmean(s.e2e_ms for s in samples if s.turn == t) for t in turns]
        prefill = [statistics.fmean(s.prefill_ms for s in samples if s.turn == t) for t in turns]
        color = COLORS.get(config)
        ax_latency.plot(turns, e2e, "o-", color=color, label=f"{config}: latency the client saw")
        ax_latency.plot(turns, prefill, "--", color=color, label=f"{config}: simulated prefill")
    ax_latency.set_xlabel("turn of the conversation")
    ax_latency.set_ylabel("mean per turn (ms)")
    ax_latency.set_ylim(bottom=0)
    ax_latency.legend(loc="upper left", fontsize=8)
    for axis in (ax_rate, ax_latency):
        axis.grid(True, alpha=0.3)
    fig.suptitle("convstate + llm-d session affinity: where continuation turns run, and what it costs")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--conversations", type=int, default=8, help="run concurrently")
    parser.add_argument("--turns", type=int, default=12, help="per conversation")
    parser.add_argument("--words", type=int, default=200, help="words of each user message")
    parser.add_argument("--max-output-tokens", type=int, default=48)
    parser.add_argument("--prefill-us", type=float, default=200.0, help="per uncached prompt token")
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--quiet-wait", type=float, default=60.0, help="seconds to wait for a quiet machine")
    args = parser.parse_args(argv)
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = set(configs) - set(CONFIGS)
    if unknown or args.replicas < 2 or args.turns < 2:
        parser.error(f"configs from {CONFIGS}, at least 2 replicas and 2 turns")

    results: dict[str, list[Sample]] = {}
    summaries: dict[str, dict[str, Any]] = {}
    busy: dict[str, float] = {}
    with harness.postgres_server() as server:
        machine = harness.machine(server)
        busy["before"] = harness.wait_for_quiet(args.quiet_wait)
        harness.log(
            f"{', '.join(configs)} at once: {args.conversations} conversations x {args.turns} turns each"
        )
        # All configurations run at the same time, so whatever else loads the machine loads them alike
        # (started one after the other: migrations and key provisioning are not for threads).
        with ExitStack() as stack, ThreadPoolExecutor(len(configs)) as pool:
            stacks = [start(stack, server, config, args) for config in configs]
            runs = {running.config: pool.submit(run_config, running, args) for running in stacks}
            for config, run in runs.items():
                results[config], summaries[config] = run.result()
    summary: dict[str, Any] = {
        "benchmark": NAME,
        "replicas": args.replicas,
        "conversations": args.conversations,
        "turns": args.turns,
        "prefill_us_per_token": args.prefill_us,
        "machine": machine,
        "machine_busy_percent_before": busy,
        "configs": summaries,
    }
    harness.RESULTS.mkdir(parents=True, exist_ok=True)
    figure = harness.RESULTS / f"{NAME}.png"
    plot(results, summaries, args.replicas, str(figure))
    summary["plot"] = str(figure.relative_to(harness.RESULTS.parent.parent))
    harness.write_result(NAME, summary)


if __name__ == "__main__":
    main()
