"""An evaluation replayed through the replay cache: the same 1,000 chat-completion requests run twice.

    python -m bench.replay [--requests 1000] [--concurrency 16] [--prefill-us 20] [--latency-ms 0]
                           [--identical 64]

Three processes besides Postgres: this driver (httpx.AsyncClient), `convstate serve` and `convstate
refbackend`. The requests are what an evaluation harness sends: one few-shot system prompt shared by all,
one question each, greedy (`temperature: 0`), `x-convstate-cache: use`. Per run it reports wall time,
requests per second, latency percentiles, the backend calls and request bytes the backend received, and
how the cache answered (`x-convstate-cache`). The second run should make no backend call at all; its
speed-up over the first depends on what a backend call costs, which the reference backend simulates
with `--prefill-us` (per prompt token not in its prefix cache) and `--latency-ms` (per call). Last,
`--identical` concurrent copies of one new request: single flight makes one backend call for all.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from collections import Counter
from typing import Any

import httpx
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from bench import harness

NAME = "replay"
MODEL = "ref-chatml"
FEW_SHOT = "\n".join(
    f"Q: What is {a} plus {b}? A: {a + b}." for a, b in ((2, 3), (10, 32), (7, 8), (100, 250), (9, 9))
)


def evaluation(requests: int, tag: str) -> list[dict[str, Any]]:
    """The evaluation's requests: a shared few-shot prompt and one question each, greedy."""
    return [
        {
            "model": MODEL,
            "messages": [
                {"role": "system", "content": f"Answer briefly, as in the examples.\n{FEW_SHOT}"},
                {"role": "user", "content": f"Q: What is {index} plus {index * 7}? ({tag})"},
            ],
            "temperature": 0,
            "max_tokens": 32,
        }
        for index in range(requests)
    ]


async def run(service: harness.Process, bodies: list[dict[str, Any]], concurrency: int) -> dict[str, Any]:
    headers = {"authorization": f"Bearer {service.api_key}", "x-convstate-cache": "use"}
    latencies: list[float] = []
    answers: Counter[str] = Counter()
    errors = 0
    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=service.url, headers=headers, timeout=120, limits=limits) as client:

        async def one(body: dict[str, Any]) -> None:
            nonlocal errors
            async with gate:
                started = time.perf_counter()
                reply = await client.post("/v1/chat/completions", json=body)
                latencies.append((time.perf_counter() - started) * 1000)
                if reply.status_code != 200:
                    errors += 1
                answers[reply.headers.get("x-convstate-cache", "none")] += 1

        started = time.perf_counter()
        await asyncio.gather(*(one(body) for body in bodies))
        wall = time.perf_counter() - started
    return {
        "requests": len(bodies),
        "errors": errors,
        "wall_seconds": round(wall, 3),
        "requests_per_second": round(len(bodies) / wall, 1),
        "latency_ms": harness.describe(latencies),
        "cache": dict(answers),
    }


def measured(
    backend_url: str, service: harness.Process, bodies: list[dict[str, Any]], concurrency: int
) -> dict[str, Any]:
    before = harness.backend_stats(backend_url)
    result = asyncio.run(run(service, bodies, concurrency))
    after = harness.backend_stats(backend_url)
    result["backend_calls"] = after["requests"] - before["requests"]
    result["backend_bytes_received"] = after["bytes_received"] - before["bytes_received"]
    return result


def plot(first: dict[str, Any], second: dict[str, Any], path: str) -> None:
    harness.RESULTS.mkdir(parents=True, exist_ok=True)
    figure, (wall, calls) = plt.subplots(1, 2, figsize=(9, 3.6))
    runs = ["first run", "second run"]
    wall.bar(runs, [first["wall_seconds"], second["wall_seconds"]], color=["#888", "#2a7"])
    wall.set_ylabel("wall time (s)")
    wall.set_title(f"{first['requests']} requests")
    calls.bar(runs, [first["backend_calls"], second["backend_calls"]], color=["#888", "#2a7"])
    calls.set_ylabel("backend calls")
    calls.set_title("calls reaching the backend")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--prefill-us", type=float, default=20.0, help="simulated prefill per uncached token")
    parser.add_argument("--latency-ms", type=int, default=0, help="simulated latency of every backend call")
    parser.add_argument("--identical", type=int, default=64, help="concurrent copies of one request")
    parser.add_argument("--plot", default=str(harness.RESULTS / f"{NAME}.png"))
    args = parser.parse_args()
    with (
        harness.postgres_server() as server,
        harness.fresh_database(server) as database_url,
        harness.start_backend(prefill_us_per_token=args.prefill_us) as backend,
        harness.start_service(database_url, backend.url, "full", log_level="warning") as service,
    ):
        httpx.post(backend.url + "/admin/latency", json={"ms": args.latency_ms})
        summary: dict[str, Any] = {
            "machine": harness.machine(database_url),
            "machine_busy_percent_before": harness.wait_for_quiet(30),
            "settings": {
                "requests": args.requests,
                "concurrency": args.concurrency,
                "prefill_us_per_token": args.prefill_us,
                "backend_latency_ms": args.latency_ms,
            },
        }
        bodies = evaluation(args.requests, uuid.uuid4().hex[:8])
        harness.log(f"first run: {args.requests} requests")
        first = measured(backend.url, service, bodies, args.concurrency)
        harness.log(f"second run: the same {args.requests} requests")
        second = measured(backend.url, service, bodies, args.concurrency)
        summary["first_run"], summary["second_run"] = first, second
        summary["speed_up"] = harness.ratio(first["wall_seconds"], second["wall_seconds"])
        summary["bytes_to_backend_second_run"] = second["backend_bytes_received"]
        harness.log(f"{args.identical} concurrent identical requests")
        httpx.post(backend.url + "/admin/latency", json={"ms": max(args.latency_ms, 500)})
        identical = evaluation(1, uuid.uuid4().hex[:8]) * args.identical
        summary["identical"] = measured(backend.url, service, identical, args.identical)
        plot(first, second, args.plot)
    harness.write_result(NAME, summary)


if __name__ == "__main__":
    main()
