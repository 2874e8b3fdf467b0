"""Engine construction and the per-connection settings each dialect needs."""

from __future__ import annotations

import asyncio
import weakref
from collections import deque
from collections.abc import Sequence, Sized
from types import MethodType
from typing import Any

import asyncpg
import orjson
from sqlalchemy import event
from sqlalchemy.engine import URL, Engine
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from service import observe


class _CountingProtocol:
    """Stands in front of an asyncpg connection's protocol and counts every exchange with the server in
    the current request's stats: each query, BEGIN and COMMIT (one statement each), each executemany
    (one round trip, one statement per row), each statement prepared or closed (a round trip, no
    statement). Everything else is the protocol's own."""

    def __init__(self, protocol: Any) -> None:
        self._protocol = protocol

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._protocol, name)
        if isinstance(value, MethodType):
            # A bound method stays what it is: kept, so the driver's next call finds it without this hook.
            setattr(self, name, value)
        return value

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


_SERVER_SETTINGS = {"application_name": "convstate"}


def create_engine(
    url: str | URL, *, pool_size: int = 10, max_overflow: int = 20, pool_timeout: float = 30.0
) -> AsyncEngine:
    """An engine; on Postgres with its statement pool (see `fetch`). `pool_size` is split between the two,
    so a replica's connections stay within pool + overflow: the statement pool carries every turn's read
    and write, a quarter of the pool (at least one) and the overflow the rest. Either pool waits at most
    `pool_timeout` seconds for a free connection, then raises TimeoutError (a 503 for the client)."""
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
        others = max(1, pool_size // 4)
        engine = create_async_engine(
            url_text,
            pool_size=others,
            max_overflow=max_overflow,
            pool_timeout=pool_timeout,
            # No pre-ping: it would add a round trip to every checkout, twice per turn. Connections are
            # recycled instead, and one that died is discarded by the pool on its first error.
            pool_recycle=1800,
            # The connection returned last is handed out first: turns keep to the connections whose
            # statements are already prepared (each first use on a connection costs a round trip).
            pool_use_lifo=True,
            **_JSON_CODEC,
            connect_args={"server_settings": _SERVER_SETTINGS},
        )
        event.listen(engine.sync_engine, "connect", _count_asyncpg)
        statements = _StatementPool(engine, max(1, pool_size - others), pool_timeout)
        _STATEMENT_POOLS[engine.sync_engine] = statements
    return engine


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


class _StatementPool:
    """A pool of asyncpg connections beside an engine's, for the statements `fetch` runs: a turn's read and
    its write. Taking a connection from SQLAlchemy's pool and giving it back cost a third of such a
    statement's CPU (two greenlet switches, the pool's bookkeeping and its reset), and asyncpg's own pool
    still starts a task to acquire with a timeout and another to release, and arms a timer on each
    release: per statement, more than the statement's own client work. This one hands an idle connection
    over and takes it back with no task, timer or round trip: `fetch` runs single statements outside any
    transaction and changes no session state, so a connection needs no reset between them.

    Connections open on demand, with the engine's settings and codecs, up to `size`; the most recently
    returned is handed out first, so turns keep to connections whose statements are already prepared. One
    that closed (the server restarted or dropped it) is noticed when it is next taken and replaced. A
    statement that fails in the server leaves its connection as it was; one that is cancelled, or fails
    in the client or on the wire, leaves it in a state nobody knows, so it is closed instead of returned.
    """

    def __init__(self, engine: AsyncEngine, size: int, timeout: float) -> None:
        self._url = engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
        self._size = size
        self._timeout = timeout
        self._opened = 0  # connections open or being opened, idle ones included
        self._idle: list[asyncpg.Connection] = []
        # Callers waiting for a connection, first come first served. A waiter is handed an idle connection,
        # or None: the slot of one that closed, in which it opens its own.
        self._waiters: deque[asyncio.Future[asyncpg.Connection | None]] = deque()
        self._closed = False

    async def fetch(self, sql: str, *args: Any) -> list[Sequence[Any]]:
        conn = await self._acquire()
        try:
            rows: list[Sequence[Any]] = await conn.fetch(sql, *args)
        except asyncpg.PostgresError:
            self._release(conn)
            raise
        except BaseException:
            conn.terminate()
            self._hand_over(None)
            raise
        self._release(conn)
        return rows

    async def _acquire(self) -> asyncpg.Connection:
        if self._closed:
            raise asyncpg.InterfaceError("the statement pool is closed")
        while self._idle:
            conn = self._idle.pop()
            if not conn.is_closed():
                return conn
            self._opened -= 1
        if self._opened < self._size:
            self._opened += 1
            return await self._connect()
        waiter: asyncio.Future[asyncpg.Connection | None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(self._timeout):
                handed = await waiter
        except BaseException:
            # The wait ended by a cancellation (the timeout's, or the caller's), which cancelled the future
            # too, unless a connection was handed over just before: then it goes to the next caller.
            if not waiter.cancelled():
                self._hand_over(waiter.result())
            raise
        return handed if handed is not None else await self._connect()

    async def _connect(self) -> asyncpg.Connection:
        """A new connection, in a slot already counted in `_opened`; the slot is given back if it fails."""
        try:
            conn = await asyncpg.connect(self._url, timeout=self._timeout, server_settings=_SERVER_SETTINGS)
        except BaseException:
            self._hand_over(None)
            raise
        try:
            await _prepare_connection(conn)
        except BaseException:
            conn.terminate()
            self._hand_over(None)
            raise
        return conn

    def _release(self, conn: asyncpg.Connection) -> None:
        if self._closed or conn.is_closed():
            conn.terminate()
            self._hand_over(None)
        else:
            self._hand_over(conn)

    def _hand_over(self, conn: asyncpg.Connection | None) -> None:
        """A connection given back (or, None, the slot of one that closed) goes to the longest waiter,
        else back to the idle ones."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return
        if conn is None:
            self._opened -= 1
        else:
            self._idle.append(conn)

    def in_use(self) -> int:
        return self._opened - len(self._idle)

    async def close(self) -> None:
        """Close the idle connections; one in use is closed when its statement ends."""
        self._closed = True
        idle, self._idle = self._idle, []
        self._opened -= len(idle)
        await asyncio.gather(*(conn.close(timeout=5) for conn in idle), return_exceptions=True)


async def _prepare_connection(conn: asyncpg.Connection) -> None:
    """The codecs SQLAlchemy's asyncpg dialect installs (JSON and JSONB as text, binary format, read with
    orjson as the engine's reads are), and the statement counting of `_count_asyncpg`."""
    await conn.set_type_codec(
        "json", encoder=str.encode, decoder=orjson.loads, schema="pg_catalog", format="binary"
    )
    await conn.set_type_codec(
        "jsonb",
        encoder=lambda text: b"\x01" + text.encode(),  # JSONB's binary format: a version byte, then text
        decoder=lambda data: orjson.loads(data[1:]),
        schema="pg_catalog",
        format="binary",
    )
    conn._protocol = _CountingProtocol(conn._protocol)


_STATEMENT_POOLS: weakref.WeakKeyDictionary[Engine, _StatementPool] = weakref.WeakKeyDictionary()


async def fetch(engine: AsyncEngine, sql: str, *args: Any) -> list[Sequence[Any]]:
    """One statement on Postgres, one round trip, no transaction (a single statement commits on its own),
    on a connection of the engine's statement pool, without SQLAlchemy's result layer. `sql` uses
    asyncpg's $1 parameters; asyncpg prepares it once per connection."""
    return await _STATEMENT_POOLS[engine.sync_engine].fetch(sql, *args)


def connections_in_use(engine: AsyncEngine) -> int:
    """Connections checked out of the engine's pool and of its statement pool."""
    pool: Any = engine.sync_engine.pool
    checked_out = pool.checkedout() if hasattr(pool, "checkedout") else 0
    statements = _STATEMENT_POOLS.get(engine.sync_engine)
    return int(checked_out) + (statements.in_use() if statements is not None else 0)


async def dispose(engine: AsyncEngine) -> None:
    """Close the engine's pools: its statement pool, if `fetch` opened one, and SQLAlchemy's."""
    pool = _STATEMENT_POOLS.pop(engine.sync_engine, None)
    if pool is not None:
        await pool.close()
    await engine.dispose()
