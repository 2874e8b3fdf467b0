"""The service as a real process (`convstate serve`): started on a loopback port, signalled or killed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

import httpx

from service.serving import free_port


class ServeProcess:
    def __init__(self, database_url: str, backend_url: str, **settings: object) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {key: value for key, value in os.environ.items() if not key.startswith("CONVSTATE_")}
        env.update(
            CONVSTATE_DATABASE_URL=database_url,
            CONVSTATE_BACKEND_URL=backend_url,
            CONVSTATE_LOG_LEVEL="warning",
            **{f"CONVSTATE_{key.upper()}": str(value) for key, value in settings.items()},
        )
        root = Path(__file__).resolve().parent.parent
        # A file, not a pipe: a process that logs more than a pipe holds would block on it.
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 (closed by __exit__)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve", "--port", str(self.port)],
            cwd=root,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=self.log,
        )

    def start(self, timeout: float = 30.0) -> ServeProcess:
        """Wait until /readyz answers 200; fails with the process's stderr if it never does."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.kill()
        raise RuntimeError(f"convstate serve did not become ready:\n{self.output()[-4000:]}")

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30)

    def terminate(self) -> None:
        self.process.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=10)

    def wait(self, timeout: float) -> int:
        return self.process.wait(timeout=timeout)

    def __enter__(self) -> ServeProcess:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.kill()
        self.log.close()
