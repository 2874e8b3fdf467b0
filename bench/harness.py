"""What every benchmark shares: a Postgres server and fresh databases, the reference backend and the
service as separate processes on loopback, an async conversation driver, Server-Timing parsing,
percentiles, the machine description, and writing results.

Each benchmark runs the service exactly as it is deployed (`python -m service.cli serve`, its own
process, Postgres through asyncpg) so the numbers include uvicorn, FastAPI and the real pool.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import asyncpg
import httpx
import orjson
from sqlalchemy.engine import make_url

from service.domain.auth import Role
from service.serving import free_port
from service.store.keys import provision_key
from service.store.migrate import upgrade

RESULTS = Path(__file__).resolve().parent / "results"
MODEL = "ref-chatml"
INSTRUCTIONS = "You are a coding agent. Use the tool results to decide the next step; be concise."
# The environment variable that points the benchmarks at an existing server instead of a throwaway one.
DATABASE_ENV = "CONVSTATE_BENCH_DATABASE_URL"

_WORDS = (
    "build",
    "test",
    "module",
    "import",
    "error",
    "passed",
    "failed",
    "retry",
    "cache",
    "handle",
    "prefix",
    "token",
    "render",
    "request",
    "response",
    "latency",
    "queue",
    "worker",
    "commit",
    "branch",
    "merge",
    "config",
    "schema",
    "index",
    "table",
    "column",
    "query",
    "timeout",
    "socket",
    "buffer",
    "stream",
    "chunk",
    "digest",
    "hash",
    "epoch",
    "replica",
    "pool",
    "connection",
    "session",
    "tenant",
)


def turn_text(conversation: int, turn: int, words: int = 48) -> str:
    """A deterministic tool-result-like user message of about 80 tokens, different on every turn."""
    rng = random.Random(conversation * 1_000_003 + turn)
    body = " ".join(rng.choice(_WORDS) for _ in range(words))
    return f"Step {turn} of task {conversation}: tool output follows. {body}. What next?"


# --- numbers -------------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100); NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def describe(values: Sequence[float]) -> dict[str, float]:
    """median, p95, p99, mean, max, rounded for the JSON summary."""
    if not values:
        return {}
    return {
        "median": round(statistics.median(values), 3),
        "p95": round(percentile(values, 95), 3),
        "p99": round(percentile(values, 99), 3),
        "mean": round(statistics.fmean(values), 3),
        "max": round(max(values), 3),
        "n": len(values),
    }


def ratio(numerator: float, denominator: float) -> float | None:
    return round(numerator / denominator, 3) if denominator else None


# Revisions before round trips were counted say only "N statements".
_TIMING = re.compile(r'(\w+);dur=([0-9.]+)(?:;desc="(\d+) statements(?:, (\d+) round trips)?")?')


@dataclass(frozen=True, slots=True)
class ServerTiming:
    db_ms: float
    statements: int
    round_trips: int
    backend_ms: float
    total_ms: float

    @property
    def overhead_ms(self) -> float:
        """Time the service spent on a turn that was not spent waiting for the backend."""
        return self.total_ms - self.backend_ms


def parse_server_timing(header: str) -> ServerTiming:
    parts = {name: (float(dur), desc, trips) for name, dur, desc, trips in _TIMING.findall(header)}
    db, statements, round_trips = parts.get("db", (0.0, "0", "0"))
    return ServerTiming(
        db_ms=db,
        statements=int(statements or 0),
        round_trips=int(round_trips or 0),
        backend_ms=parts.get("backend", (0.0, "", ""))[0],
        total_ms=parts["total"][0],
    )


# --- machine -------------------------------------------------------------------------------------


def _meminfo_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        return None
    return None


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None


def _revision() -> str | None:
    """The commit measured, marked dirty when the service's sources differ from it."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        changed = subprocess.run(
            ["git", "status", "--porcelain", "--", "service", "migrations"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return f"{head}+dirty" if changed else head


def machine(database_url: str) -> dict[str, Any]:
    return {
        "revision": _revision(),
        "cpus": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "memory_gib": _meminfo_gib(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "postgres": asyncio.run(_server_version(database_url)),
    }


def rss_kib(pid: int) -> int | None:
    """Resident set size of a process, from /proc (Linux)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


# --- CPU accounting ------------------------------------------------------------------------------

_TICKS = os.sysconf("SC_CLK_TCK")
# CPU (in cores) taken by processes outside a benchmark above which a measured pass counts as disturbed.
DISTURBED_CORES = 0.1


def _stat_fields(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def cpu_seconds(pid: int) -> float:
    """user + system CPU of one process (all its threads) so far."""
    fields = _stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / _TICKS if fields else float("nan")


def threads_cpu_ms(pid: int) -> float:
    """On-CPU time of a process's live threads so far, in nanosecond resolution (schedstat): precise
    enough for one turn, which the clock ticks of /proc/<pid>/stat (10 ms) are not."""
    total_ns = 0
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                total_ns += int((task / "schedstat").read_text().split()[0])
            except (OSError, IndexError, ValueError):  # a thread that exited meanwhile
                continue
    except OSError:
        return float("nan")
    return total_ns / 1e6


def tree_cpu_seconds(root: int) -> float:
    """CPU of a process, its live children, and its children that already exited (the kernel adds
    those to the parent's cutime/cstime once reaped): for Postgres, whose connections are processes."""
    fields = _stat_fields(root)
    if fields is None:
        return float("nan")
    total = sum(int(value) for value in fields[11:15]) / _TICKS
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            child = _stat_fields(int(entry.name))
            if child is not None and child[1] == str(root):
                total += (int(child[11]) + int(child[12])) / _TICKS
    return total


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, from /proc/stat."""
    values = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return (sum(values) - idle) / _TICKS, sum(values) / _TICKS


def wait_for_quiet(limit_seconds: float, busy_percent: float = 15.0) -> float:
    """Wait (at most `limit_seconds`) until the machine is nearly idle, so other work on a shared box
    does not end up in the numbers; returns the busy percent last seen."""
    deadline = time.monotonic() + limit_seconds
    while True:
        busy0, total0 = machine_cpu()
        time.sleep(1.0)
        busy1, total1 = machine_cpu()
        busy = 100 * (busy1 - busy0) / max(total1 - total0, 1e-9)
        if busy <= busy_percent or time.monotonic() >= deadline:
            if busy > busy_percent:
                log(f"machine still {busy:.0f}% busy with other work; measuring anyway")
            return round(busy, 1)
        log(f"machine {busy:.0f}% busy with other work; waiting for it to settle")
        time.sleep(4.0)


class CpuMeter:
    """CPU spent by each benchmark process and by the rest of the machine over a measured interval."""

    def __init__(self, processes: Mapping[str, int], postgres_pid: int | None) -> None:
        self._processes = dict(processes)
        self._postgres = postgres_pid
        self._start = self._read()

    def _read(self) -> dict[str, float]:
        reading = {name: cpu_seconds(pid) for name, pid in self._processes.items()}
        reading["driver"] = own_cpu_seconds()
        if self._postgres is not None:
            reading["postgres"] = tree_cpu_seconds(self._postgres)
        reading["machine_busy"], reading["machine_total"] = machine_cpu()
        return reading

    def stop(self, turns: int) -> dict[str, Any]:
        end = self._read()
        delta = {name: end[name] - self._start[name] for name in end}
        wall = delta.pop("machine_total") / (os.cpu_count() or 1)
        busy = delta.pop("machine_busy")
        ours = sum(value for value in delta.values() if value == value)  # skip NaN
        return {
            "cpu_ms_per_turn": {
                name: round(1000 * value / max(turns, 1), 3) for name, value in delta.items()
            },
            "machine_busy_percent": round(100 * busy / max(wall * (os.cpu_count() or 1), 1e-9), 1),
            # Work of processes outside the benchmark (another test run on a shared machine).
            "other_processes_cores": round(max(busy - ours, 0.0) / max(wall, 1e-9), 2),
        }


# --- Postgres ------------------------------------------------------------------------------------


def _connect_args(url_text: str) -> dict[str, Any]:
    url = make_url(url_text)
    return {
        "host": url.host,
        "port": url.port,
        "user": url.username,
        "password": url.password,
        "database": url.database or "postgres",
    }


async def _server_version(url_text: str) -> str:
    conn = await asyncpg.connect(**_connect_args(url_text))
    try:
        return str(await conn.fetchval("SHOW server_version"))
    finally:
        await conn.close()


async def _postmaster_pid(url_text: str) -> int | None:
    conn = await asyncpg.connect(**_connect_args(url_text))
    try:
        data_directory = await conn.fetchval("SHOW data_directory")
    except asyncpg.PostgresError:
        return None
    finally:
        await conn.close()
    try:
        return int((Path(data_directory) / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def postmaster_pid(url_text: str) -> int | None:
    """The server's postmaster pid when it runs on this machine and its data directory is readable."""
    return asyncio.run(_postmaster_pid(url_text))


async def _admin(url_text: str, statement: str) -> None:
    conn = await asyncpg.connect(**_connect_args(url_text))
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


@contextmanager
def postgres_server() -> Iterator[str]:
    """A Postgres server URL: $CONVSTATE_BENCH_DATABASE_URL if set, else a throwaway cluster (the test
    suite's: fsync and synchronous_commit off, so numbers measure the service, not the disk)."""
    from tests.pg import postgres_url

    with postgres_url(os.environ.get(DATABASE_ENV)) as url:
        yield url


@contextmanager
def fresh_database(server_url: str, source: Path | None = None) -> Iterator[str]:
    """An empty database migrated to head (of the service at `source`, default this checkout), dropped
    afterwards."""
    name = f"convstate_bench_{uuid.uuid4().hex[:12]}"
    asyncio.run(_admin(server_url, f'CREATE DATABASE "{name}"'))
    url = make_url(server_url).set(database=name).render_as_string(hide_password=False)
    try:
        if source is None:
            upgrade(url)
        else:
            subprocess.run(
                [sys.executable, "-m", "service.cli", "migrate"],
                cwd=source,
                env={**os.environ, "PYTHONPATH": str(source), "CONVSTATE_DATABASE_URL": url},
                check=True,
                capture_output=True,
            )
        yield url
    finally:
        asyncio.run(_admin(server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


# What Postgres executes (pg_stat_statements, loaded by the throwaway cluster of tests/pg.py): statements
# of the background workers that are not a turn's are left out (the invalidation feed's polls).
_BACKGROUND = "%invalidations%"


async def _statements(database_url: str, reset: bool) -> int | None:
    url = make_url(database_url)
    conn = await asyncpg.connect(**_connect_args(url.set(database="postgres").render_as_string(False)))
    try:
        await conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        if reset:
            await conn.execute("SELECT pg_stat_statements_reset()")
            return None
        calls = await conn.fetchval(
            "SELECT coalesce(sum(calls), 0) FROM pg_stat_statements"
            " WHERE dbid = (SELECT oid FROM pg_database WHERE datname = $1) AND query NOT ILIKE $2",
            url.database,
            _BACKGROUND,
        )
        return int(calls)
    except asyncpg.PostgresError as error:  # a server without pg_stat_statements preloaded
        log(f"pg_stat_statements unavailable: {error}")
        return None
    finally:
        await conn.close()


def reset_statements(database_url: str) -> None:
    asyncio.run(_statements(database_url, reset=True))


def executed_statements(database_url: str, turns: int) -> float | None:
    """Statements Postgres executed on the database since the reset, per turn (foreign-key checks,
    BEGIN and COMMIT included)."""
    calls = asyncio.run(_statements(database_url, reset=False))
    return None if calls is None else round(calls / max(turns, 1), 2)


# --- processes -----------------------------------------------------------------------------------


class Process:
    """A server started as its own process, its output in a log file; ready when `probe` answers 200."""

    def __init__(
        self,
        name: str,
        args: list[str],
        env: Mapping[str, str],
        port: int,
        probe: str,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.api_key = ""  # the service's: a user key of the benchmark tenant
        self._logdir = Path(tempfile.mkdtemp(prefix=f"convstate-bench-{name}-"))
        self.log = self._logdir / "output.log"
        self._log_handle = self.log.open("wb")
        self._popen = subprocess.Popen(
            args, env={**os.environ, **env}, stdout=self._log_handle, stderr=subprocess.STDOUT, cwd=cwd
        )
        self._probe = probe

    @property
    def pid(self) -> int:
        return self._popen.pid

    def wait_ready(self, timeout: float = 30.0) -> Process:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._popen.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self._popen.returncode}): {self.tail()}")
            try:
                if httpx.get(self.url + self._probe, timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        tail = self.tail()  # before stop(), which closes the log
        self.stop()
        raise TimeoutError(f"{self.name} not ready in {timeout}s: {tail}")

    def tail(self, lines: int = 20) -> str:
        self._log_handle.flush()
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def signal(self, signum: int, wait: float = 60.0) -> int:
        """Send `signum` (SIGTERM: drain and exit; SIGKILL: die mid-work) and wait; the exit status."""
        self._popen.send_signal(signum)
        return self._popen.wait(timeout=wait)

    def stop(self) -> None:
        if self._popen.poll() is None:
            self._popen.send_signal(signal.SIGINT)
            try:
                self._popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._popen.kill()
                self._popen.wait(timeout=10)
        self._log_handle.close()
        shutil.rmtree(self._logdir, ignore_errors=True)

    def __enter__(self) -> Process:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def start_backend(port: int | None = None, **settings: object) -> Process:
    """`convstate refbackend` with CONVSTATE_REF_* settings; context long enough for 200+ turns."""
    port = port or free_port()
    env = {f"CONVSTATE_REF_{key.upper()}": str(value) for key, value in settings.items()}
    env.setdefault("CONVSTATE_REF_MAX_MODEL_LEN", "131072")
    args = [sys.executable, "-m", "service.cli", "refbackend", "--host", "127.0.0.1", "--port", str(port)]
    return Process("refbackend", args, env, port, "/health").wait_ready()


def start_service(database_url: str, backend_url: str, mode: str, **settings: object) -> Process:
    """`convstate serve`: one uvicorn process, settings from CONVSTATE_* like a deployment, with API keys
    on (so the figures include authentication) and a user key of tenant `bench` in `.api_key`."""
    return launch_service(database_url, backend_url, mode, **settings).wait_ready()


def launch_service(database_url: str, backend_url: str, mode: str, **settings: object) -> Process:
    """`start_service` without waiting for it to be ready: start several at once, then wait for each."""
    return launch_service_from(None, database_url, backend_url, mode, settings)


def _provision(database_url: str, source: Path | None) -> str:
    """A user key of tenant `bench`, made by the service's own code (another revision's tables may
    differ from this checkout's)."""
    if source is None:
        return provision_key(database_url, "bench", Role.USER, "bench")
    code = (
        "from service.domain.auth import Role; from service.store.keys import provision_key; "
        f"print(provision_key({database_url!r}, 'bench', Role.USER, 'bench'))"
    )
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=source,
        env={**os.environ, "PYTHONPATH": str(source)},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


def launch_service_from(
    source: Path | None,
    database_url: str,
    backend_url: str,
    mode: str,
    settings: Mapping[str, object],
    wrapper: Sequence[str] = (),
) -> Process:
    """`launch_service` of the service at `source` (another revision's tree), or this checkout's (None);
    `wrapper` runs it under another program (valgrind, for `bench.instructions`)."""
    api_key = _provision(database_url, source)
    port = free_port()
    env = {
        "CONVSTATE_DATABASE_URL": database_url,
        "CONVSTATE_BACKEND_URL": backend_url,
        "CONVSTATE_BACKEND_MODE": mode,
        **{f"CONVSTATE_{key.upper()}": str(value) for key, value in settings.items()},
        **({"PYTHONPATH": str(source)} if source is not None else {}),
    }
    serve = ["-m", "service.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
    args = [*wrapper, sys.executable, *serve]
    service = Process("service", args, env, port, "/readyz", cwd=source)
    service.api_key = api_key
    return service


def parse_settings(parser: argparse.ArgumentParser, pairs: Sequence[str]) -> dict[str, str]:
    """`--set name=value` options -> {name: value}; the service reads them as CONVSTATE_<NAME>."""
    settings = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.strip():
            parser.error(f"--set expects NAME=VALUE, got {pair!r}")
        settings[name.strip().lower()] = value.strip()
    return settings


def backend_stats(backend_url: str) -> dict[str, Any]:
    stats: dict[str, Any] = httpx.get(backend_url + "/stats", timeout=10).json()
    return stats


# --- the conversation driver ---------------------------------------------------------------------


@dataclass(slots=True)
class Turn:
    """One measured turn, as the client saw it."""

    conversation: int
    turn: int  # 1-based; the response's depth is turn - 1
    started: float  # seconds since the run started
    e2e_ms: float
    status: int
    overhead_ms: float = float("nan")
    backend_ms: float = float("nan")
    db_ms: float = float("nan")
    statements: int = 0
    round_trips: int = 0
    bytes_sent: int = 0
    decision: str = ""
    error: str | None = None
    rendered_tokens: int | None = None  # only where turns are sequential (delta of backend /stats)


def request_body(conversation: int, turn: int, previous: str | None, max_output_tokens: int) -> bytes:
    body: dict[str, Any] = {
        "model": MODEL,
        "instructions": INSTRUCTIONS,
        "input": turn_text(conversation, turn),
        "max_output_tokens": max_output_tokens,
    }
    if previous is not None:
        body["previous_response_id"] = previous
    return orjson.dumps(body)


def measured_turn(
    conversation: int,
    turn: int,
    started: float,
    e2e_ms: float,
    status: int,
    headers: Mapping[str, str],
    error_text: str | None = None,
) -> Turn:
    """A turn's sample from its response headers (the openai SDK and httpx both give a mapping)."""
    sample = Turn(conversation, turn, started, e2e_ms, status)
    if "server-timing" in headers:
        timing = parse_server_timing(headers["server-timing"])
        sample.overhead_ms, sample.backend_ms = timing.overhead_ms, timing.backend_ms
        sample.db_ms, sample.statements, sample.round_trips = (
            timing.db_ms,
            timing.statements,
            timing.round_trips,
        )
    sample.bytes_sent = int(headers.get("x-convstate-bytes-sent", 0))
    sample.decision = headers.get("x-convstate-decision", "")
    if status != 200:
        sample.error = (error_text or "")[:300] or f"HTTP {status}"
    return sample


@dataclass(slots=True)
class DriveResult:
    turns: list[Turn] = field(default_factory=list)
    wall_seconds: float = 0.0
    transport_errors: int = 0


async def drive(
    base_url: str,
    *,
    api_key: str,
    conversations: int,
    turns: int,
    concurrency: int,
    max_output_tokens: int = 48,
    conversation_offset: int = 0,
    on_turn: Callable[[Turn], Awaitable[None] | None] | None = None,
    rate: float | None = None,
) -> DriveResult:
    """`conversations` conversations of `turns` turns each, every conversation sequential (a turn
    continues the previous response), at most `concurrency` requests in flight at once. A failed turn
    ends its conversation (there is no id to continue from) and is counted. With `rate`, turns start
    no faster than `rate` per second overall (paced load: latency without the client saturating the
    service); without it every conversation sends its next turn as soon as the last one is answered."""
    result = DriveResult()
    timeout = httpx.Timeout(120.0, connect=10.0)
    headers = {"content-type": "application/json", "authorization": f"Bearer {api_key}"}
    # One single-connection client per request slot, not one shared pool: httpcore scans (and polls the
    # socket of) every pooled connection on each request, which at 32+ connections costs the driver more
    # CPU than the service it measures. The queue of idle clients is also the concurrency gate.
    single = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    clients = [
        httpx.AsyncClient(base_url=base_url, limits=single, timeout=timeout, headers=headers)
        for _ in range(concurrency)
    ]
    idle: asyncio.Queue[httpx.AsyncClient] = asyncio.Queue()
    for client in clients:
        idle.put_nowait(client)
    origin = time.perf_counter()
    next_start = origin

    async def pace() -> None:
        nonlocal next_start
        if rate is None:
            return
        now = time.perf_counter()
        slot = max(now, next_start)
        next_start = slot + 1 / rate
        if slot > now:
            await asyncio.sleep(slot - now)

    async def conversation(index: int) -> None:
        previous: str | None = None
        for turn in range(1, turns + 1):
            body = request_body(index, turn, previous, max_output_tokens)
            await pace()
            client = await idle.get()
            start = time.perf_counter()
            try:
                response = await client.post("/v1/responses", content=body)
            except httpx.HTTPError as exc:
                result.transport_errors += 1
                elapsed = (time.perf_counter() - start) * 1000
                result.turns.append(Turn(index, turn, start - origin, elapsed, 0, error=repr(exc)))
                return
            finally:
                idle.put_nowait(client)
            elapsed = (time.perf_counter() - start) * 1000
            failure = response.text if response.status_code != 200 else None
            sample = measured_turn(
                index, turn, start - origin, elapsed, response.status_code, response.headers, failure
            )
            result.turns.append(sample)
            if on_turn is not None:
                pending = on_turn(sample)
                if pending is not None:
                    await pending
            if sample.error is not None:
                return
            previous = orjson.loads(response.content)["id"]

    try:
        first = conversation_offset
        await asyncio.gather(*(conversation(first + i) for i in range(conversations)))
    finally:
        await asyncio.gather(*(client.aclose() for client in clients))
    result.wall_seconds = time.perf_counter() - origin
    return result


def decisions(samples: Sequence[Turn]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for sample in samples:
        counts[sample.decision or "none"] = counts.get(sample.decision or "none", 0) + 1
    return dict(sorted(counts.items(), key=lambda item: -item[1]))


# --- output --------------------------------------------------------------------------------------


def write_result(
    name: str, summary: Mapping[str, Any], samples: Mapping[str, Sequence[Turn]] | None = None
) -> Path:
    """Print the summary as JSON on stdout and write it to bench/results/<name>.json; per-turn samples
    go beside it in <name>.turns.json for anyone who wants to re-plot."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    text = json.dumps(summary, indent=2, sort_keys=False)
    path.write_text(text + "\n")
    if samples is not None:
        per_run = {run: [asdict(sample) for sample in turns] for run, turns in samples.items()}
        (RESULTS / f"{name}.turns.json").write_bytes(orjson.dumps(per_run))
    print(text)
    return path


def log(message: str) -> None:
    """Progress on stderr, so stdout stays one JSON document."""
    print(f"[bench] {message}", file=sys.stderr, flush=True)
