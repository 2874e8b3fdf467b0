"""Reseed, measured: what the backend does for the first turn after it lost its handles, with the parent's
prefix rebuilt from its stored token ids (CONVSTATE_RESEED=artifact) or the whole history rendered again
(CONVSTATE_RESEED=render).

    python -m bench.reseed [--turns 40] [--restart-every 5] [--words 160]

One conversation in `cache_ref` mode against the reference backend, restarted every `--restart-every`
turns (a new epoch: every handle is gone). For each turn after a restart: the prompt tokens the backend
tokenized (its /stats `tokens_rendered`), the bytes posted to it, the time spent waiting for it, and the
decision; the same conversation runs once per setting on a fresh database and backend.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from typing import Any

import httpx
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import openai

from bench import harness
from bench.harness import Turn

NAME = "reseed"
SETTINGS = ("artifact", "render")
COLORS = {"artifact": "tab:green", "render": "tab:red"}
# The writer stores a committed turn's ids within a batch; the restart waits for it.
ARTIFACT_DELAY = 0.5


def run(server: str, reseed: str, args: argparse.Namespace) -> list[Turn]:
    """The turns that followed a restart."""
    with (
        harness.fresh_database(server) as database_url,
        harness.start_backend() as backend,
        harness.start_service(
            database_url, backend.url, "cache_ref", reseed=reseed, backend_info_ttl=0.05
        ) as service,
    ):
        client = openai.OpenAI(
            base_url=f"{service.url}/v1", api_key=service.api_key, max_retries=0, timeout=120
        )
        previous: str | None = None
        after_restart: list[Turn] = []
        for turn in range(1, args.turns + 1):
            restarted = turn > 1 and (turn - 1) % args.restart_every == 0
            if restarted:
                time.sleep(ARTIFACT_DELAY)
                httpx.post(f"{backend.url}/admin/restart").raise_for_status()
                time.sleep(0.1)  # past the service's model-card TTL: it sees the new epoch
            before = harness.backend_stats(backend.url)["tokens_rendered"]
            started = time.perf_counter()
            raw = client.responses.with_raw_response.create(
                model=harness.MODEL,
                instructions=harness.INSTRUCTIONS,
                input=harness.turn_text(1, turn, args.words),
                previous_response_id=previous,
                max_output_tokens=args.max_output_tokens,
            )
            elapsed = (time.perf_counter() - started) * 1000
            previous = raw.parse().id
            if restarted:
                sample = harness.measured_turn(1, turn, 0.0, elapsed, raw.status_code, raw.headers)
                sample.rendered_tokens = harness.backend_stats(backend.url)["tokens_rendered"] - before
                after_restart.append(sample)
        return after_restart


def summarize(samples: Sequence[Turn]) -> dict[str, Any]:
    return {
        "turns_after_restart": len(samples),
        "tokens_rendered": harness.describe([float(s.rendered_tokens or 0) for s in samples]),
        "bytes_sent": harness.describe([float(s.bytes_sent) for s in samples]),
        "backend_ms": harness.describe([s.backend_ms for s in samples]),
        "e2e_ms": harness.describe([s.e2e_ms for s in samples]),
        "decisions": harness.decisions(samples),
    }


def plot(results: dict[str, list[Turn]], path: str) -> None:
    fig, (ax_tokens, ax_bytes) = plt.subplots(1, 2, figsize=(12, 4.5))
    for reseed, samples in results.items():
        turns = [s.turn for s in samples]
        color = COLORS[reseed]
        ax_tokens.plot(turns, [s.rendered_tokens or 0 for s in samples], "o-", color=color, label=reseed)
        ax_bytes.plot(turns, [s.bytes_sent for s in samples], "o-", color=color, label=reseed)
    ax_tokens.set_ylabel("prompt tokens the backend tokenized")
    ax_bytes.set_ylabel("bytes posted to the backend")
    for axis in (ax_tokens, ax_bytes):
        axis.set_xlabel("turn (the first after a backend restart)")
        axis.set_ylim(bottom=0)
        axis.grid(True, alpha=0.3)
        axis.legend(title="CONVSTATE_RESEED", loc="upper left")
    fig.suptitle("convstate: the first turn after a backend restart, reseeded from token ids or re-rendered")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--turns", type=int, default=40)
    parser.add_argument("--restart-every", type=int, default=5)
    parser.add_argument("--words", type=int, default=160, help="words of each user message")
    parser.add_argument("--max-output-tokens", type=int, default=256, help="room for replies to finish")
    parser.add_argument("--quiet-wait", type=float, default=60.0, help="seconds to wait for a quiet machine")
    args = parser.parse_args(argv)
    if args.restart_every < 2 or args.turns <= args.restart_every:
        parser.error("--restart-every must be at least 2 and below --turns")

    results: dict[str, list[Turn]] = {}
    busy: dict[str, float] = {}
    with harness.postgres_server() as server:
        machine = harness.machine(server)
        for reseed in SETTINGS:
            busy[reseed] = harness.wait_for_quiet(args.quiet_wait)
            harness.log(f"reseed={reseed}: {args.turns} turns, a restart every {args.restart_every}")
            results[reseed] = run(server, reseed, args)
    summaries = {reseed: summarize(samples) for reseed, samples in results.items()}
    artifact, render = summaries["artifact"], summaries["render"]
    summary: dict[str, Any] = {
        "benchmark": NAME,
        "turns": args.turns,
        "restart_every": args.restart_every,
        "words": args.words,
        "machine": machine,
        "machine_busy_percent_before": busy,
        "settings": summaries,
        "comparison": {
            "tokens_rendered_render_over_artifact_median": harness.ratio(
                render["tokens_rendered"]["median"], artifact["tokens_rendered"]["median"]
            ),
            "bytes_artifact_over_render_median": harness.ratio(
                artifact["bytes_sent"]["median"], render["bytes_sent"]["median"]
            ),
            "backend_ms_artifact_over_render_median": harness.ratio(
                artifact["backend_ms"]["median"], render["backend_ms"]["median"]
            ),
        },
    }
    harness.RESULTS.mkdir(parents=True, exist_ok=True)
    figure = harness.RESULTS / f"{NAME}.png"
    plot(results, str(figure))
    summary["plot"] = str(figure.relative_to(harness.RESULTS.parent.parent))
    harness.write_result(NAME, summary, results)


if __name__ == "__main__":
    main()
