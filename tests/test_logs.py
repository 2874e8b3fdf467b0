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


def test_a_line_carries_the_record_time_and_its_extra_fields() -> None:
    """The time's text is made once a second: a record of another second gets its own; fields passed
    with `extra` are in the line, logging's own attributes are not."""
    first = logging.LogRecord("convstate.api", logging.ERROR, __file__, 1, "a", None, None)
    first.created, first.route = 1_800_000_000.25, "/v1/responses"
    later = logging.LogRecord("convstate.api", logging.ERROR, __file__, 1, "b", None, None)
    later.created = 1_800_000_061.5
    formatter = JsonFormatter()
    one, two = (orjson.loads(formatter.format(record)) for record in (first, later))
    assert (one["time"], two["time"]) == ("2027-01-15T08:00:00", "2027-01-15T08:01:01")
    assert one["route"] == "/v1/responses" and "route" not in two
    assert not {"pathname", "lineno", "thread", "process", "msg", "args"} & set(one)
