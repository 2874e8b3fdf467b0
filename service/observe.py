"""Per-request accounting (time in the database, SQL statements and round trips, time waiting for the
backend) and the request id, carried in a context variable so every layer can add to it, and every log
line name the request, without passing it around. Rendered as Server-Timing.

Statements and round trips are counted where they leave the process (store/db.py): on Postgres at the
asyncpg protocol, so BEGIN, COMMIT and statement preparation count like any query."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager
from contextvars import ContextVar
from dataclasses import dataclass, field
from types import TracebackType
from typing import ParamSpec, TypeVar

from service.store.outage import outage

log = logging.getLogger("convstate.store")

P = ParamSpec("P")
R = TypeVar("R")


@dataclass(slots=True)
class RequestStats:
    request_id: str | None = None
    started: float = field(default_factory=time.perf_counter)
    db_seconds: float = 0.0
    sql_statements: int = 0
    round_trips: int = 0
    backend_seconds: float = 0.0
    # How the replay cache answered the request's backend call, if it was asked (x-convstate-cache).
    cache: str | None = None

    def server_timing(self) -> str:
        total = (time.perf_counter() - self.started) * 1000
        return (
            f'db;dur={self.db_seconds * 1000:.3f};desc="{self.sql_statements} statements, '
            f'{self.round_trips} round trips", '
            f"backend;dur={self.backend_seconds * 1000:.3f}, total;dur={total:.3f}"
        )


current: ContextVar[RequestStats | None] = ContextVar("convstate_request_stats", default=None)


def count_round_trip(statements: int) -> None:
    """One exchange with the database that executed `statements` statements (0 for a prepare)."""
    stats = current.get()
    if stats is not None:
        stats.round_trips += 1
        stats.sql_statements += statements


class _Timed:
    """Adds the block's duration to the current request's db or backend time. A class, not a generator:
    it runs several times on every turn, and a generator-based context manager costs several times more."""

    __slots__ = ("_db", "_started")

    def __init__(self, db: bool) -> None:
        self._db = db
        self._started = 0.0

    def __enter__(self) -> None:
        self._started = time.perf_counter()

    def __exit__(
        self, _type: type[BaseException] | None, _error: BaseException | None, _tb: TracebackType | None
    ) -> None:
        stats = current.get()
        if stats is not None:
            elapsed = time.perf_counter() - self._started
            if self._db:
                stats.db_seconds += elapsed
            else:
                stats.backend_seconds += elapsed


def note_cache(result: str) -> None:
    stats = current.get()
    if stats is not None:
        stats.cache = result


def in_backend() -> AbstractContextManager[None]:
    return _Timed(db=False)


class _StoreCall(_Timed):
    __slots__ = ("_name",)

    def __init__(self, name: str) -> None:
        super().__init__(db=True)
        self._name = name

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        super().__exit__(kind, error, tb)
        if isinstance(error, Exception) and (unavailable := outage(error)) is not None:
            log.warning("database unavailable in %s: %r", self._name, error)
            raise unavailable from error


def store_call(name: str) -> AbstractContextManager[None]:
    """The block is database time, and a database that cannot be reached raises ServiceUnavailable (see
    store/outage.py) instead of the driver's exception."""
    return _StoreCall(name)


def db_call(function: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
    """Decorator for store methods: `store_call` around their whole duration (checkout, statements,
    commit)."""

    @functools.wraps(function)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        with store_call(function.__qualname__):
            return await function(*args, **kwargs)

    return wrapper
