"""JSON log lines name the request they were written for, from any layer, without passing it around."""

from __future__ import annotations

import asyncio
import logging
import time

import orjson
import pytest

from service import observe
from service.logs import AccessLog, JsonFormatter


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


async def test_access_lines_wait_for_a_batch_or_the_flush_timer(caplog: pytest.LogCaptureFixture) -> None:
    """Each line keeps its own request's fields and end time, and leaves no later than FLUSH_SECONDS after
    the first one waiting, or at once when BATCH wait."""
    caplog.set_level(logging.INFO, logger="convstate.access")
    access = AccessLog()
    access.add("POST", "/v1/responses", 200, 0.0125, "req_one", ("10.0.0.1", 5555))
    ended = time.time()
    access.add("GET", "/readyz", 503, 0.001, "req_two", None)
    assert _access_records(caplog) == []  # waiting for the timer
    await asyncio.sleep(AccessLog.FLUSH_SECONDS * 1.5)
    first, second = _access_records(caplog)
    entry = orjson.loads(JsonFormatter().format(first))
    assert entry["message"] == "POST /v1/responses 200" and entry["request_id"] == "req_one"
    assert entry["status"] == 200 and entry["duration_ms"] == 12.5 and entry["client"] == "10.0.0.1:5555"
    assert abs(first.created - ended) < 0.1  # the request's end, not the flush's
    assert second.getMessage() == "GET /readyz 503" and "client" not in second.__dict__
    caplog.clear()
    for n in range(AccessLog.BATCH):
        access.add("GET", "/healthz", 200, 0.001, f"req_{n}", None)
    assert len(_access_records(caplog)) == AccessLog.BATCH  # a full batch leaves at once
    access.add("GET", "/healthz", 200, 0.001, "req_last", None)
    access.flush()
    assert _access_records(caplog)[-1].__dict__["request_id"] == "req_last"


def test_no_access_lines_wait_when_info_is_off(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="convstate.access")
    access = AccessLog()
    access.add("POST", "/v1/responses", 200, 0.01, "req_one", None)  # no loop, no timer: nothing kept
    access.flush()
    assert _access_records(caplog) == []


def _access_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [record for record in caplog.records if record.name == "convstate.access"]
