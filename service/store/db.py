"""Engine construction and the per-connection settings each dialect needs."""

from __future__ import annotations

from collections.abc import Sequence, Sized
from typing import Any

import orjson
from sqlalchemy import ColumnElement, String, any_, event, literal
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.orm import InstrumentedAttribute
from sqlalchemy.util import greenlet_spawn

from service import observe


class _CountingProtocol:
    """Stands in front of an asyncpg connection's protocol and counts every exchange with the server in
    the current request's stats: each query, BEGIN and COMMIT (one statement each), each executemany
    (one round trip, one statement per row), each statement prepared or closed (a round trip, no
    statement). Everything else is the protocol's own."""

    def __init__(self, protocol: Any) -> None:
        self._protocol = protocol

    def __getattr__(self, name: str) -> Any:
        return getattr(self._protocol, name)

    def bind_execute(self, *args: Any, **kwargs: Any) -> Any:
        observe.count_round_trip(1)
        return self._protocol.bind_execute(*args, **kwargs)

    def bind_execute_many(self, *args: Any, **kwargs: Any) -> Any:
        rows = kwargs["args"] if "args" in kwargs else args[1]
        observe.count_round_trip(len(rows) if isinstance(rows, Sized) else 1)
        return self._protocol.bind_execute_many(*args, **kwargs)

    def query(self, *args: Any, **kwargs: Any) -> Any:
        observe.count_round_trip(1)
        return self._protocol.query(*args, **kwargs)

    def prepare(self, *args: Any, **kwargs: Any) -> Any:
        observe.count_round_trip(0)
        return self._protocol.prepare(*args, **kwargs)

    def close_statement(self, *args: Any, **kwargs: Any) -> Any:
        observe.count_round_trip(0)
        return self._protocol.close_statement(*args, **kwargs)


def _count_asyncpg(dbapi_connection: Any, _record: Any) -> None:
    driver = dbapi_connection.driver_connection
    driver._protocol = _CountingProtocol(driver._protocol)


def _count_sqlite(*_args: Any) -> None:
    """SQLite runs in-process: every statement is one call into the driver's thread."""
    observe.count_round_trip(1)


def _json_text(value: Any) -> str:
    return orjson.dumps(value).decode()


# Items and settings are JSON columns on every write and read of a turn; orjson is several times faster
# than the standard library at both.
_JSON_CODEC = {"json_serializer": _json_text, "json_deserializer": orjson.loads}


def create_engine(url: str | URL, *, pool_size: int = 10, max_overflow: int = 20) -> AsyncEngine:
    url_text = url if isinstance(url, str) else url.render_as_string(hide_password=False)
    if url_text.startswith("sqlite"):
        # One writer at a time anyway; WAL lets readers proceed while a turn commits.
        engine = create_async_engine(url_text, **_JSON_CODEC)

        @event.listens_for(engine.sync_engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=10000")
            cursor.close()

        event.listen(engine.sync_engine, "before_cursor_execute", _count_sqlite)

    else:
        engine = create_async_engine(
            url_text,
            pool_size=pool_size,
            max_overflow=max_overflow,
            # No pre-ping: it would add a round trip to every checkout, twice per turn. Connections are
            # recycled instead, and one that died is discarded by the pool on its first error.
            pool_recycle=1800,
            # The connection returned last is handed out first: turns keep to the connections whose
            # statements are already prepared (each first use on a connection costs a round trip).
            pool_use_lifo=True,
            **_JSON_CODEC,
            connect_args={"server_settings": {"application_name": "convstate"}},
        )
        event.listen(engine.sync_engine, "connect", _count_asyncpg)
    return engine


def one_of(
    engine: AsyncEngine, column: InstrumentedAttribute[str], values: Sequence[str]
) -> ColumnElement[bool]:
    """`column IN values` as one statement whatever the number of values: `= ANY($1)` on Postgres. An IN
    list of each length is another prepared statement, and batches of varying size (the artifact writer's)
    would push the turn's own statements out of each connection's statement cache, so that turns prepare
    them again."""
    if engine.dialect.name == "postgresql":
        return column == any_(literal(list(values), ARRAY(String)))
    return column.in_(list(values))


class StatementCounter:
    """Counts the statements and round trips the current task sends to any database, as a request's
    Server-Timing does (for tests)."""

    def __init__(self) -> None:
        self._stats = observe.RequestStats()
        self._token = observe.current.set(self._stats)

    @property
    def count(self) -> int:
        return self._stats.sql_statements

    @property
    def round_trips(self) -> int:
        return self._stats.round_trips

    def reset(self) -> None:
        self._stats.sql_statements = self._stats.round_trips = 0

    def close(self) -> None:
        observe.current.reset(self._token)


def autocommit(engine: AsyncEngine) -> AsyncEngine:
    """The same pool, without transactions: a single-statement read then costs no BEGIN/ROLLBACK."""
    return engine.execution_options(isolation_level="AUTOCOMMIT")


async def fetch(engine: AsyncEngine, sql: str, *args: Any) -> list[Sequence[Any]]:
    """One statement on Postgres, one round trip, on a pooled connection's asyncpg driver: no result
    layer, and the connection taken from the pool bare, without the SQLAlchemy connection around it
    (together most of the CPU of a small statement). No transaction: a single statement commits on its
    own. `sql` uses asyncpg's $1 parameters; asyncpg prepares it once per connection."""
    pooled = await engine.raw_connection()
    try:
        driver = pooled.driver_connection
        assert driver is not None
        try:
            return list(await driver.fetch(sql, *args))
        except BaseException:
            if driver.is_closed():
                await greenlet_spawn(pooled.invalidate)  # never handed out again
            raise
    finally:
        # Returning it may close it (past the pool's size), which SQLAlchemy does in a greenlet.
        await greenlet_spawn(pooled.close)
