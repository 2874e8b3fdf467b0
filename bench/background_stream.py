"""Background responses created with `stream: true`: what recording their events costs, and how far
behind a client on another replica follows them.

    python -m bench.background_stream [--responses 20] [--chunk-delays-ms 0,20] [--poll-interval 0.2]

Two `convstate serve` processes on one fresh Postgres database and the reference backend (one token per
chunk, reasoning on; a chunk at once, or every few milliseconds: each of `--chunk-delays-ms` is a run).
For each response, one client creates it on the first replica with
`background` and `stream` and reads its events; as soon as `response.created` arrives, a second client
follows it on the other replica (`GET /v1/responses/{id}?stream=true`). Reported: events per response, the
INSERTs that recorded them (events written by one INSERT share its `created_at`), the follow lag (when
the follower got an event minus when the creator got it, per event), and the time to replay a finished
response's whole stream from the other replica. A PNG plots the follow lag of every event.
"""

from __future__ import annotations

import argparse
import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any

import asyncpg
import httpx
import matplotlib
import orjson
from sqlalchemy.engine import make_url

from bench import harness

matplotlib.use("Agg")
import matplotlib.pyplot as plt

NAME = "background_stream"
MODEL = "ref-chatml"


def _events(reply: httpx.Response) -> Iterator[tuple[float, dict[str, Any]]]:
    """(arrival time, event) for each Server-Sent Event of a reply."""
    buffer = b""
    for chunk in reply.iter_raw():
        buffer += chunk
        while b"\n\n" in buffer:
            frame, buffer = buffer.split(b"\n\n", 1)
            yield time.monotonic(), orjson.loads(frame.split(b"\ndata: ", 1)[1])


def one_response(creator: httpx.Client, follower: httpx.Client) -> dict[str, Any]:
    body = {
        "model": MODEL,
        "input": "Write at length.",
        "background": True,
        "stream": True,
        "reasoning": {"effort": "low"},
    }
    created: dict[int, float] = {}
    followed: dict[int, float] = {}
    started = threading.Event()
    response_id = ""

    def follow() -> None:
        started.wait(30)
        with follower.stream("GET", f"/v1/responses/{response_id}", params={"stream": "true"}) as reply:
            for arrived, event in _events(reply):
                followed[event["sequence_number"]] = arrived

    following = threading.Thread(target=follow)
    following.start()
    with creator.stream("POST", "/v1/responses", json=body) as reply:
        for arrived, event in _events(reply):
            created[event["sequence_number"]] = arrived
            if event["type"] == "response.created":
                response_id = event["response"]["id"]
                started.set()
    following.join(60)
    begun = time.monotonic()
    with follower.stream("GET", f"/v1/responses/{response_id}", params={"stream": "true"}) as reply:
        replayed = sum(1 for _ in _events(reply))
    replay_ms = (time.monotonic() - begun) * 1000
    return {
        "id": response_id,
        "events": len(created),
        "followed_all": sorted(followed) == sorted(created),
        "replayed_all": replayed == len(created),
        "lag_ms": [(followed[n] - created[n]) * 1000 for n in sorted(created) if n in followed],
        "replay_ms": replay_ms,
    }


async def _inserts(database_url: str) -> dict[str, int]:
    """Per response, how many INSERTs recorded its events (one `created_at` per INSERT)."""
    url = make_url(database_url)
    conn = await asyncpg.connect(
        host=url.host, port=url.port, user=url.username, password=url.password, database=url.database
    )
    try:
        rows = await conn.fetch(
            "SELECT response_id, count(DISTINCT created_at) AS inserts FROM response_events GROUP BY 1"
        )
    finally:
        await conn.close()
    return {row["response_id"]: row["inserts"] for row in rows}


def measure(
    backend_url: str,
    creator: httpx.Client,
    follower: httpx.Client,
    database_url: str,
    delay_ms: int,
    count: int,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    httpx.post(f"{backend_url}/admin/stream", json={"chunk_delay_ms": delay_ms}).raise_for_status()
    harness.log(f"{count} background streams, a chunk every {delay_ms} ms, followed from the other replica")
    runs = [one_response(creator, follower) for _ in range(count)]
    inserts = asyncio.run(_inserts(database_url))
    events = sum(run["events"] for run in runs)
    return {
        "chunk_delay_ms": delay_ms,
        "responses": len(runs),
        "all_events_followed": all(run["followed_all"] for run in runs),
        "all_events_replayed": all(run["replayed_all"] for run in runs),
        "events_per_response": harness.describe([run["events"] for run in runs]),
        "inserts_per_response": harness.describe([inserts[run["id"]] for run in runs]),
        "events_per_insert": round(events / sum(inserts[run["id"]] for run in runs), 2),
        "follow_lag_ms": harness.describe([lag for run in runs for lag in run["lag_ms"]]),
        "replay_ms": harness.describe([run["replay_ms"] for run in runs]),
    }, runs


def plot(runs: dict[int, list[dict[str, Any]]], path: str) -> None:
    figure, axis = plt.subplots(figsize=(8, 4.5))
    for (delay, responses), color in zip(runs.items(), ("tab:blue", "tab:orange", "tab:green"), strict=False):
        for index, run in enumerate(responses):
            label = f"a chunk every {delay} ms" if index == 0 else None
            axis.plot(
                range(len(run["lag_ms"])), run["lag_ms"], color=color, alpha=0.3, linewidth=1, label=label
            )
    axis.set_xlabel("event (sequence number)")
    axis.set_ylabel("follow lag on the other replica (ms)")
    axis.set_title("Background streams followed from another replica")
    axis.legend()
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--responses", type=int, default=20)
    parser.add_argument("--chunk-delays-ms", default="0,20", help="comma list, one run each")
    parser.add_argument("--poll-interval", type=float, default=0.2)
    args = parser.parse_args()
    settings = {"log_level": "warning", "stream_poll_interval": args.poll_interval}
    runs: dict[int, list[dict[str, Any]]] = {}
    with (
        harness.postgres_server() as server,
        harness.fresh_database(server) as database_url,
        harness.start_backend(stream_chunk_tokens=1) as backend,
        harness.start_service(database_url, backend.url, "full", **settings) as first,
        harness.start_service(database_url, backend.url, "full", **settings) as second,
    ):
        busy = harness.wait_for_quiet(30)
        auth = {"authorization": f"Bearer {first.api_key}"}
        summary: dict[str, Any] = {
            "machine": harness.machine(server),
            "machine_busy_percent_before": busy,
            "poll_interval": args.poll_interval,
            "runs": [],
        }
        with (
            httpx.Client(base_url=first.url, headers=auth, timeout=120) as creator,
            httpx.Client(base_url=second.url, headers=auth, timeout=120) as follower,
        ):
            for delay in (int(value) for value in args.chunk_delays_ms.split(",")):
                result, runs[delay] = measure(
                    backend.url, creator, follower, database_url, delay, args.responses
                )
                summary["runs"].append(result)
    harness.RESULTS.mkdir(parents=True, exist_ok=True)
    plot(runs, str(harness.RESULTS / f"{NAME}.png"))
    harness.write_result(NAME, summary)


if __name__ == "__main__":
    main()
