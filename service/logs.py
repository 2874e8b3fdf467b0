"""Structured JSON logs, one object per line, for the processes the CLI starts."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from typing import Any

import orjson

from service import observe

# The peer of an ASGI connection (scope["client"]): host and port, when the server knows them.
Client = tuple[str, int] | None
_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record. It formats a line per request (the access log), so what repeats is
    computed once: the time's text once a second, the extra fields by a set difference (an extra
    `request_id` overrides the current request's)."""

    def __init__(self) -> None:
        super().__init__()
        self._second = -1
        self._time = ""

    def format(self, record: logging.LogRecord) -> str:
        second = int(record.created)
        if second != self._second:
            self._second, self._time = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        entry: dict[str, Any] = {
            "ts": round(record.created, 6),
            "time": self._time,
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        stats = observe.current.get()
        if stats is not None and stats.request_id is not None:
            entry["request_id"] = stats.request_id
        fields = record.__dict__
        for key in fields.keys() - _STANDARD:
            entry[key] = fields[key]
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


def configure_logging(level: str) -> None:
    # The lines carry no source file, thread or process: logging need not find them for every record (the
    # optimizations its documentation lists), most of the cost of the access log's line per request.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # One line per backend call drowns the service's own log; keep the client libraries to warnings.
    for noisy in ("httpx", "httpx2", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


class AccessLog:
    """A line per HTTP request (logger `convstate.access`, level info): method, path, status, duration,
    client and request id. Lines are handed to logging in batches, as nginx's `access_log ... buffer=
    flush=` writes them: a line waits at most FLUSH_SECONDS, or until BATCH lines wait, and `flush`
    writes what waits at shutdown. Written as each request ended, through logging's code, cold by then,
    a line cost a `cache_ref` turn about 3.5% of its CPU; a batch runs that code once, warm."""

    FLUSH_SECONDS = 0.5
    BATCH = 256

    def __init__(self) -> None:
        self._log = logging.getLogger("convstate.access")
        self._waiting: list[tuple[float, str, str, int, float, str, Client]] = []
        self._timer: asyncio.TimerHandle | None = None

    def add(
        self, method: str, path: str, status: int, seconds: float, request_id: str, client: Client
    ) -> None:
        if not self._log.isEnabledFor(logging.INFO):
            return
        self._waiting.append((time.time(), method, path, status, seconds, request_id, client))
        if len(self._waiting) >= self.BATCH:
            self.flush()
        elif self._timer is None:
            # An empty context: the flush belongs to no request.
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(self.FLUSH_SECONDS, self.flush, context=contextvars.Context())

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        waiting, self._waiting = self._waiting, []
        for ended, method, path, status, seconds, request_id, client in waiting:
            fields = {"request_id": request_id, "status": status, "duration_ms": round(seconds * 1000, 3)}
            if client is not None:
                fields["client"] = f"{client[0]}:{client[1]}"
            record = self._log.makeRecord(
                self._log.name,
                logging.INFO,
                __file__,
                0,
                "%s %s %d",
                (method, path, status),
                None,
                extra=fields,
            )
            record.created, record.msecs = ended, (ended % 1) * 1000  # when the request ended
            self._log.handle(record)
