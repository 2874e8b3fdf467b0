"""What the database executes for one turn, counted twice: by Postgres itself (pg_stat_statements, every
statement: BEGIN and COMMIT, foreign-key checks, the statements of background workers excluded) and by
the service (Server-Timing: statements and round trips, counted at the asyncpg protocol). A chain turn
(`previous_response_id`) and a conversation turn, on the cache_ref path and on the full path."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Mapping

import asyncpg
import pytest
from sqlalchemy.engine import make_url

from service.serving import ServerThread
from service.store.migrate import upgrade
from tests.conftest import Service, db_counts, start_service

MODEL = "ref-chatml"
WARM_UP = 5  # keys, the tenant's salt and every statement prepared on the pooled connections
MEASURED = 5
# Background work on the same database that is not a turn's: the invalidation feed's polls.
BACKGROUND = "%invalidations%"


@pytest.fixture(scope="module")
def database(new_postgres_database: object) -> str:
    url: str = new_postgres_database()  # type: ignore[operator]
    upgrade(url)
    return url


@pytest.fixture(scope="module")
def services(database: str, reference_backend: ServerThread) -> Iterator[dict[str, Service]]:
    started = {
        mode: start_service(
            database,
            reference_backend.url,
            backend_mode=mode,
            invalidation_max_lag=60,
            reaper_interval=3600,
            retention_interval=3600,
            # The artifact writer's statements are background work too (a turn runs the same ones with
            # or without it: tests/test_e2e_artifacts.py).
            token_artifacts=False,
        )
        for mode in ("cache_ref", "full")
    }
    yield started
    for service in started.values():
        service.server.stop()


async def _admin(database: str) -> asyncpg.Connection:
    """A connection to the server's maintenance database, so its own statements are not counted."""
    url = make_url(database)
    return await asyncpg.connect(
        host=url.host, port=url.port, user=url.username, password=url.password, database="postgres"
    )


async def _reset(database: str) -> None:
    conn = await _admin(database)
    try:
        await conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        await conn.execute("SELECT pg_stat_statements_reset()")
    finally:
        await conn.close()


async def _executed(database: str) -> dict[str, int]:
    """Calls per normalized statement on the test database since the last reset."""
    conn = await _admin(database)
    try:
        rows = await conn.fetch(
            """SELECT query, calls FROM pg_stat_statements
                WHERE dbid = (SELECT oid FROM pg_database WHERE datname = $1) AND query NOT ILIKE $2""",
            make_url(database).database,
            BACKGROUND,
        )
    finally:
        await conn.close()
    return {row["query"]: row["calls"] for row in rows}


def _turns(service: Service, lineage: str, count: int, state: dict[str, str]) -> list[Mapping[str, str]]:
    """`count` more turns of one lineage (continuing `state`); each reply's headers."""
    client = service.openai()
    replies: list[Mapping[str, str]] = []
    for _ in range(count):
        if lineage == "conversation":
            if "conversation" not in state:
                state["conversation"] = client.conversations.create().id
            raw = client.responses.with_raw_response.create(
                model=MODEL, input="next", conversation=state["conversation"], max_output_tokens=16
            )
        else:
            raw = client.responses.with_raw_response.create(
                model=MODEL, input="next", previous_response_id=state.get("previous"), max_output_tokens=16
            )
        state["previous"] = raw.parse().id
        replies.append(raw.headers)
    return replies


def _turn_cost(
    database: str, service: Service, lineage: str
) -> tuple[set[str], set[tuple[int, int]], float, dict[str, int]]:
    state: dict[str, str] = {}
    _turns(service, lineage, WARM_UP, state)
    asyncio.run(_reset(database))
    replies = _turns(service, lineage, MEASURED, state)
    executed = asyncio.run(_executed(database))
    decisions = {headers["x-convstate-decision"] for headers in replies}
    counted = {db_counts(headers) for headers in replies}
    return decisions, counted, sum(executed.values()) / MEASURED, executed


# (path, lineage) -> what Postgres executes per turn besides the turn's own statements: the foreign-key
# checks of the rows written (the response's parent or conversation, each item's response and
# conversation, the prefix record's response).
FOREIGN_KEY_CHECKS = {"chain": 1 + 2 + 1, "conversation": 1 + 2 * 2 + 1}


@pytest.mark.parametrize(
    ("mode", "lineage", "decision", "statements"),
    [
        # the parent (in a conversation with the lock), the write
        ("cache_ref", "chain", "cache_ref; reason=hit", 2),
        ("cache_ref", "conversation", "cache_ref; reason=hit", 2),
        # the parent and the write: the history is the one this process kept (service/domain/histories.py)
        ("full", "chain", "full; reason=mode_full", 2),
        # the turn lock with the head, the conversation's history, the write
        ("full", "conversation", "full; reason=mode_full", 3),
    ],
)
def test_what_the_database_executes_per_turn(
    database: str, services: dict[str, Service], lineage: str, mode: str, decision: str, statements: int
) -> None:
    decisions, counted, per_turn, executed = _turn_cost(database, services[mode], lineage)
    assert decisions == {decision}
    # Statements and round trips as the service counts them: one statement per round trip, no
    # BEGIN/COMMIT, whatever the depth.
    assert counted == {(statements, statements)}
    # As Postgres counts them: the same statements plus the foreign-key checks of the rows written.
    assert per_turn == statements + FOREIGN_KEY_CHECKS[lineage], executed
