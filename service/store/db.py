"""Engine construction and the per-connection settings each dialect needs."""

from __future__ import annotations

from typing import Any

import orjson
from sqlalchemy import event
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from service import observe


def _count_statement(*_args: Any) -> None:
    observe.count_statement()


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

    else:
        engine = create_async_engine(
            url_text,
            pool_size=pool_size,
            max_overflow=max_overflow,
            # No pre-ping: it would add a round trip to every checkout, twice per turn. Connections are
            # recycled instead, and one that died is discarded by the pool on its first error.
            pool_recycle=1800,
            **_JSON_CODEC,
            connect_args={"server_settings": {"application_name": "convstate"}},
        )
    event.listen(engine.sync_engine, "before_cursor_execute", _count_statement)
    return engine


class StatementCounter:
    """Counts SQL statements sent on an engine (executemany counts once: one round trip)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.count = 0
        self.statements: list[str] = []
        self._engine = engine
        event.listen(engine.sync_engine, "before_cursor_execute", self._on_execute)

    def _on_execute(self, _conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        self.count += 1
        self.statements.append(statement)

    def reset(self) -> None:
        self.count = 0
        self.statements.clear()

    def close(self) -> None:
        event.remove(self._engine.sync_engine, "before_cursor_execute", self._on_execute)


def autocommit(engine: AsyncEngine) -> AsyncEngine:
    """The same pool, without transactions: a single-statement read then costs no BEGIN/ROLLBACK."""
    return engine.execution_options(isolation_level="AUTOCOMMIT")
