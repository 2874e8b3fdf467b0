"""Structured JSON logs, one object per line, for the processes the CLI starts."""

from __future__ import annotations

import logging
import time
from typing import Any

import orjson

from service import observe

_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record. It formats a line per request (the access log), so what repeats is
    computed once: the time's text once a second, the extra fields by a set difference."""

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
