"""JSON log lines name the request they were written for, from any layer, without passing it around."""

from __future__ import annotations

import logging

import orjson

from service import observe
from service.logs import JsonFormatter


def _line(message: str) -> dict[str, object]:
    record = logging.LogRecord("convstate.backend", logging.WARNING, __file__, 1, message, None, None)
    entry: dict[str, object] = orjson.loads(JsonFormatter().format(record))
    return entry


def test_lines_written_while_serving_a_request_carry_its_id() -> None:
    token = observe.current.set(observe.RequestStats("req_abc"))
    try:
        entry = _line("backend failed")
    finally:
        observe.current.reset(token)
    assert entry["request_id"] == "req_abc" and entry["message"] == "backend failed"
    assert "request_id" not in _line("between requests")
