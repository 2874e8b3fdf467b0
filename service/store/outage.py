"""Which database errors mean "unreachable or saturated, retry shortly" (503) rather than a bug (500).

The one place that knows the drivers' exception types; the decorator every store method wears
(`observe.db_call`) and every unit of work (`store.unit`) apply it, so every caller of the store (HTTP
routes, the WebSocket mode, background turns) sees a typed ServiceUnavailable instead of a driver
exception.
"""

from __future__ import annotations

import asyncpg
from sqlalchemy import exc as sa_exc

from service.errors import ServiceUnavailable

# Raised as they are when a connection is being opened (SQLAlchemy wraps only errors on open connections):
# refused, reset or timed out sockets; a server starting up, shutting down or out of connection slots.
_UNREACHABLE = (
    OSError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.TooManyConnectionsError,
)


def outage(error: BaseException) -> ServiceUnavailable | None:
    """The ServiceUnavailable that stands for `error`, or None when `error` is not an outage."""
    if isinstance(error, sa_exc.TimeoutError):  # every pooled connection stayed checked out
        return ServiceUnavailable("The database is busy; retry shortly.", code="database_unavailable")
    lost = isinstance(error, sa_exc.DBAPIError) and error.connection_invalidated
    if lost or isinstance(error, _UNREACHABLE):
        return ServiceUnavailable("The database is unavailable; retry shortly.", code="database_unavailable")
    return None
