"""A throwaway PostgreSQL cluster for the test session, started from the installed binaries.

initdb and pg_ctl refuse to run as root, so as root the cluster is owned by and run as `postgres`.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from service.serving import free_port


def _bindir() -> Path | None:
    pg_config = shutil.which("pg_config")
    candidates = []
    if pg_config:
        out = subprocess.run(
            [pg_config, "--bindir"], capture_output=True, text=True, check=False
        ).stdout.strip()
        candidates.append(out)
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    for candidate in candidates:
        if candidate and (Path(candidate) / "initdb").exists():
            return Path(candidate)
    return None


class ThrowawayCluster:
    """`crash_safe` keeps commits durable across a stop of the server (not of the machine): tuned for
    speed, the cluster acknowledges commits before their WAL leaves shared memory, and a crash loses them."""

    def __init__(self, *, crash_safe: bool = False) -> None:
        bindir = _bindir()
        if bindir is None:
            raise RuntimeError(
                "PostgreSQL binaries (initdb, pg_ctl) not found; set CONVSTATE_TEST_DATABASE_URL"
            )
        self.bindir = bindir
        self.root = Path(tempfile.mkdtemp(prefix="convstate-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self._as_root = os.geteuid() == 0
        self._crash_safe = crash_safe

    def _run(self, *args: str) -> None:
        command = list(args)
        if self._as_root:
            command = ["runuser", "-u", "postgres", "--", *command]
        subprocess.run(command, check=True, capture_output=True, text=True)

    def start(self) -> str:
        if self._as_root:
            shutil.chown(self.root, "postgres", "postgres")
        self._run(
            str(self.bindir / "initdb"),
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--no-sync",
        )
        self.start_server()
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/postgres"

    def start_server(self) -> None:
        options = (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off "
            f"-c synchronous_commit={'on' if self._crash_safe else 'off'} -c full_page_writes=off "
            "-c max_connections=200 "
            # What the database really executes (tests/test_e2e_turn_cost.py, bench/): every statement,
            # foreign-key checks and BEGIN/COMMIT included.
            "-c shared_preload_libraries=pg_stat_statements -c pg_stat_statements.track=all"
        )
        self._run(
            str(self.bindir / "pg_ctl"),
            "-D",
            str(self.data),
            "-o",
            options,
            "-l",
            str(self.root / "log"),
            "-w",
            "start",
        )

    def stop_server(self) -> None:
        """Stop at once, as a crash would: open connections break, nothing is shut down cleanly."""
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop")

    def stop(self) -> None:
        try:
            self.stop_server()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


@contextmanager
def postgres_url(configured: str | None) -> Iterator[str]:
    """`configured` if given, else the URL of a throwaway cluster that lives as long as the context."""
    if configured:
        yield configured
        return
    cluster = ThrowawayCluster()
    try:
        yield cluster.start()
    finally:
        cluster.stop()
