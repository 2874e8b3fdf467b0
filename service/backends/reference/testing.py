"""Run the reference backend on a free loopback port in a background thread, for tests."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn

from service.backends.reference.config import ReferenceSettings
from service.backends.reference.server import create_app


@contextmanager
def serve(settings: ReferenceSettings | None = None, *, startup_timeout: float = 10.0) -> Iterator[str]:
    """Yield the base URL (http://127.0.0.1:PORT) of a running backend; stop it on exit."""
    app = create_app(settings or ReferenceSettings())
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="refbackend", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("reference backend did not start")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
