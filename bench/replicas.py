"""Several replicas on one Postgres behind a round-robin front: throughput as replicas are added, and a
rolling restart under load.

    python -m bench.replicas [--replicas 1,2,3] [--conversations 16] [--turns 20] [--mode cache_ref]
                             [--restart-conversations 4]

Per replica count: a fresh database, that many `convstate serve` processes (small pools, as the chart
sizes them), the reference backend as its own process, and the round-robin front of tests/replicas.py.
Closed-loop conversations go through the front; it reports turns per second, latency percentiles, errors,
decisions and how evenly the replicas were used. Then, with the largest count, every replica is replaced
one at a time (out of rotation, SIGTERM, drain, a new process joins) while conversations run: turns
acknowledged, failed attempts (retried by the client from the same parent), acknowledged turns missing
afterwards (must be 0) and latency during the restart.

The front runs in this driver's process (a thread), so on a small machine it competes with the driver
and the replicas for the same cores: the throughput figures are for comparing replica counts here, not a
capacity figure.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

from bench import harness
from tests.replicas import Load, ReplicaSet

NAME = "replicas"
REPLICA_SETTINGS = {"db_pool_size": 8, "db_max_overflow": 4, "log_level": "warning"}


def throughput(server: str, count: int, mode: str, conversations: int, turns: int) -> dict[str, Any]:
    with (
        harness.fresh_database(server) as database_url,
        harness.start_backend() as backend,
        ReplicaSet(database_url, backend.url, mode, count, **REPLICA_SETTINGS) as replicas,
    ):
        busy = harness.wait_for_quiet(30)
        result = asyncio.run(
            harness.drive(
                replicas.url,
                api_key=replicas.api_key,
                conversations=conversations,
                turns=turns,
                concurrency=conversations,
            )
        )
        ok = [turn for turn in result.turns if turn.status == 200]
        return {
            "replicas": count,
            "machine_busy_percent_before": busy,
            "turns": len(ok),
            "errors": len(result.turns) - len(ok),
            "turns_per_second": round(len(ok) / result.wall_seconds, 1),
            "e2e_ms": harness.describe([turn.e2e_ms for turn in ok]),
            "decisions": harness.decisions(ok),
            "requests_per_replica": sorted(replicas.front.served.values()),
        }


def rolling_restart(server: str, count: int, mode: str, conversations: int) -> dict[str, Any]:
    with (
        harness.fresh_database(server) as database_url,
        harness.start_backend() as backend,
        ReplicaSet(database_url, backend.url, mode, count, **REPLICA_SETTINGS) as replicas,
    ):
        with Load(replicas.url, conversations, api_key=replicas.api_key, max_seconds=300) as load:
            time.sleep(2.0)
            before = len(load.acknowledged)
            started = time.monotonic()
            statuses = replicas.rolling_restart()
            restart_seconds = time.monotonic() - started
            during = load.acknowledged[before:]
            time.sleep(2.0)
        return {
            "replicas": count,
            "restart_seconds": round(restart_seconds, 1),
            "exit_statuses": statuses,
            "acknowledged": len(load.acknowledged),
            "acknowledged_during_restart": len(during),
            "failed_attempts": len(load.failures),
            "failures": sorted({failure[:80] for failure in load.failures}),
            "acknowledged_missing_afterwards": len(load.missing()),
            "e2e_ms_during_restart": harness.describe([turn.seconds * 1000 for turn in during]),
        }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--replicas", default="1,2,3", help="comma list of replica counts")
    parser.add_argument("--conversations", type=int, default=16)
    parser.add_argument("--turns", type=int, default=20)
    parser.add_argument("--mode", default="cache_ref", choices=("full", "cache_ref"))
    parser.add_argument("--restart-conversations", type=int, default=4)
    args = parser.parse_args()
    counts = [int(count) for count in args.replicas.split(",")]
    with harness.postgres_server() as server:
        summary: dict[str, Any] = {"machine": harness.machine(server), "mode": args.mode}
        summary["throughput"] = []
        for count in counts:
            harness.log(f"{count} replica(s): {args.conversations} conversations x {args.turns} turns")
            summary["throughput"].append(throughput(server, count, args.mode, args.conversations, args.turns))
        harness.log(f"rolling restart of {max(counts)} replicas under load")
        summary["rolling_restart"] = rolling_restart(
            server, max(counts), args.mode, args.restart_conversations
        )
    harness.write_result(NAME, summary)


if __name__ == "__main__":
    main()
