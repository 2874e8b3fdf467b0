"""Run an ASGI app with uvicorn: as the service process, draining on SIGTERM, or in a background thread on
a loopback port (demo, tests, benchmarks)."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from types import FrameType, TracebackType
from typing import Any

import uvicorn

log = logging.getLogger("convstate.serving")


class DrainingServer(uvicorn.Server):
    """uvicorn that meets the first SIGTERM (or SIGINT) by draining before it shuts down: `drain` runs
    while the server still accepts connections, so a request that arrives meanwhile gets a 503 it can
    retry elsewhere instead of a refused connection; then the usual shutdown follows, and the process
    ends by the signal like any uvicorn server. A second signal exits at once."""

    def __init__(self, config: uvicorn.Config, drain: Callable[[], Awaitable[None]]) -> None:
        super().__init__(config)
        self._drain = drain
        self._signalled = False
        self._draining: asyncio.Task[None] | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._signalled:
            self.force_exit = True
            super().handle_exit(sig, frame)
            return
        self._signalled = True
        # Once shut down, uvicorn raises the signal again: the process ends by it, as without a drain.
        self._captured_signals.append(sig)

    async def on_tick(self, counter: int) -> bool:
        if self._signalled and self._draining is None:
            log.info("signal received: draining before shutdown")
            self._draining = asyncio.get_running_loop().create_task(self._run_drain())
        if self._draining is not None and self._draining.done():
            self.should_exit = True
        return await super().on_tick(counter)

    async def _run_drain(self) -> None:
        try:
            await self._drain()
        except Exception:
            log.exception("draining failed; shutting down anyway")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


class ServerThread:
    def __init__(self, app: Any, host: str = "127.0.0.1", port: int | None = None) -> None:
        self.host = host
        self.port = port or free_port(host)
        config = uvicorn.Config(app, host=host, port=self.port, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self.server.run, name=f"uvicorn:{self.port}", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 20.0) -> ServerThread:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive():
                raise RuntimeError(f"server on port {self.port} failed to start")
            if time.monotonic() > deadline:
                raise TimeoutError(f"server on port {self.port} did not start in {timeout}s")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=10)

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
