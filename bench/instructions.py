"""Instructions the service executes per turn, counted by valgrind: a measure of its CPU work that the
machine's load does not move.

    python -m bench.instructions [--turns 100] [--baseline REV] [--modes cache_ref] [--lineages chain]

Each target (this checkout, and with `--baseline` another revision, from `git archive`) runs alone under
`valgrind --tool=callgrind`, on its own fresh database, against the same reference backend. After a
warm-up lineage and the first turns of the measured one, the counters are zeroed; then `--turns` more
turns of the measured lineage, one after another, and the counters are dumped: user-space instructions
of the whole process (every thread) per turn. Under valgrind the service runs about 50 times slower, so
the polls that run on a clock (the invalidation feed, the backend's model list) would land many times
per turn: they are set far apart (`CONVSTATE_INVALIDATION_MAX_LAG`, `CONVSTATE_BACKEND_INFO_TTL`). The
token-artifact writer still runs, in batches of fewer turns than at full speed.

Instructions are not time: they leave out the kernel (syscalls, the network stack), cache misses and
waits. On a shared or virtual machine, where CPU time per turn moves by up to 2x between passes, they
are what repeats: the same revision counts the same, within about 1%, run after run.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import orjson

from bench import harness
from bench.depth import checkout, responses_driver

# The polls on a clock, moved out of the measured window (see the module's docstring).
QUIET_SETTINGS = {"invalidation_max_lag": 60, "backend_info_ttl": 3600}
WARMUP_TURNS = 5
# Turns of the measured lineage before the counters start: the statements prepared, the pools grown.
LEAD_TURNS = 20
STARTUP_SECONDS = 600.0  # imports under valgrind take a minute or more


def summary(dump: Path) -> int:
    """The instruction count of a callgrind dump (its `summary:` line)."""
    for line in dump.read_text().splitlines():
        if line.startswith("summary:"):
            return int(line.split()[1])
    raise ValueError(f"no summary in {dump}")


def count(
    source: Path | None, server: str, backend_url: str, mode: str, lineage: str, turns: int, output: Path
) -> float:
    """Instructions per turn of the service at `source` (None: this checkout)."""
    wrapper = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={output}/callgrind.out.%p"]
    with (
        harness.fresh_database(server, source=source) as database_url,
        harness.launch_service_from(
            source, database_url, backend_url, mode, QUIET_SETTINGS, wrapper
        ).wait_ready(STARTUP_SECONDS) as service,
    ):
        one = responses_driver(f"{service.url}/v1", service.api_key, lineage, max_output_tokens=16)
        for turn in range(1, WARMUP_TURNS + 1):
            one(0, turn)
        for turn in range(1, LEAD_TURNS + 1):
            one(1, turn)
        subprocess.run(["callgrind_control", "--zero", str(service.pid)], check=True, capture_output=True)
        for turn in range(LEAD_TURNS + 1, LEAD_TURNS + turns + 1):
            sample = one(1, turn)
            if sample.status != 200:
                raise RuntimeError(f"turn {turn} failed: {sample.error}")
        subprocess.run(["callgrind_control", "--dump", str(service.pid)], check=True, capture_output=True)
    dumps = sorted(output.glob(f"callgrind.out.{service.pid}.*"))
    if not dumps:
        raise RuntimeError("valgrind wrote no dump")
    return summary(dumps[0]) / turns


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--turns", type=int, default=100, help="measured turns per target")
    parser.add_argument("--baseline", help="another revision to count the same way")
    parser.add_argument("--modes", default="cache_ref", help="backend modes, comma-separated")
    parser.add_argument("--lineages", default="chain", help="chain, conversation or both, comma-separated")
    args = parser.parse_args(argv)
    for tool in ("valgrind", "callgrind_control"):
        if shutil.which(tool) is None:
            parser.error(f"{tool} is not installed (Debian: apt-get install valgrind)")
    results: dict[str, Any] = {}
    with ExitStack() as stack:
        server = stack.enter_context(harness.postgres_server())
        backend = stack.enter_context(harness.start_backend())
        sources: dict[str, Path | None] = {"convstate": None}
        if args.baseline:
            sources[f"baseline@{args.baseline}"] = stack.enter_context(checkout(args.baseline))
        for lineage in args.lineages.split(","):
            for mode in args.modes.split(","):
                counted: dict[str, float] = {}
                for name, source in sources.items():
                    with tempfile.TemporaryDirectory(prefix="convstate-callgrind-") as output:
                        per_turn = count(source, server, backend.url, mode, lineage, args.turns, Path(output))
                    counted[name] = round(per_turn)
                    harness.log(f"{name} {mode}/{lineage}: {per_turn / 1e6:.3f} M instructions per turn")
                if args.baseline:
                    current, baseline = counted.values()
                    counted["ratio"] = round(current / baseline, 3)
                    harness.log(f"{mode}/{lineage}: current/baseline {counted['ratio']}")
                results[f"{mode}/{lineage}"] = counted
    sys.stdout.write(orjson.dumps(results, option=orjson.OPT_INDENT_2).decode() + "\n")


if __name__ == "__main__":
    main()
