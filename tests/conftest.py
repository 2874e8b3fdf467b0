"""Shared fixtures: real databases (a throwaway Postgres cluster and SQLite files), the reference backend
and the service as real HTTP servers on loopback."""

from __future__ import annotations

import asyncio
import os
import re
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import convstate_client
import httpx
import openai
import pytest
from fastapi import FastAPI
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from service.app import create_app
from service.config import Settings
from service.domain.auth import Role
from service.serving import ServerThread
from service.store.db import create_engine, dispose
from service.store.keys import provision_key
from service.store.migrate import upgrade
from tests.pg import postgres_url


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """Base URL of a Postgres server whose superuser may create databases."""
    with postgres_url(os.environ.get("CONVSTATE_TEST_DATABASE_URL")) as url:
        yield url


async def _create_database(server_url: str) -> str:
    url = make_url(server_url)
    name = f"convstate_test_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(
        host=url.host,
        port=url.port,
        user=url.username,
        password=url.password,
        database=url.database or "postgres",
    )
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return url.set(database=name).render_as_string(hide_password=False)


@pytest.fixture(scope="session")
def new_postgres_database(postgres_server: str) -> object:
    """Factory: a fresh, empty database on the test server."""

    def make() -> str:
        return asyncio.run(_create_database(postgres_server))

    return make


@pytest.fixture(scope="session")
def migrated_urls(new_postgres_database: object, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """One migrated database per dialect for the session."""
    sqlite_url = f"sqlite+aiosqlite:///{tmp_path_factory.mktemp('sqlite') / 'convstate.db'}"
    postgres_url = new_postgres_database()  # type: ignore[operator]
    for url in (sqlite_url, postgres_url):
        upgrade(url)
    return {"sqlite": sqlite_url, "postgres": postgres_url}


@pytest.fixture(params=["sqlite", "postgres"])
async def engine(request: pytest.FixtureRequest, migrated_urls: dict[str, str]) -> AsyncIterator[AsyncEngine]:
    """A migrated database on each dialect: store tests run on both."""
    engine = create_engine(migrated_urls[request.param])
    try:
        yield engine
    finally:
        await dispose(engine)


@pytest.fixture(scope="session")
def reference_backend() -> Iterator[ServerThread]:
    from service.backends.reference.config import ReferenceSettings
    from service.backends.reference.server import create_app as create_reference_app

    with ServerThread(create_reference_app(ReferenceSettings())) as server:
        yield server


class MediaServer:
    """Images on loopback whose bytes the test can change: what an http(s) image URL serves."""

    def __init__(self) -> None:
        from fastapi import FastAPI
        from fastapi.responses import Response

        self.images: dict[str, bytes] = {}
        app = FastAPI()

        @app.get("/img/{name}")
        async def image(name: str) -> Response:
            if name not in self.images:
                return Response(status_code=404)
            return Response(self.images[name], media_type="image/png")

        self.server = ServerThread(app)

    def put(self, name: str, data: bytes) -> str:
        self.images[name] = data
        return f"{self.server.url}/img/{name}"


@pytest.fixture(scope="session")
def media_server() -> Iterator[MediaServer]:
    media = MediaServer()
    with media.server:
        yield media


@pytest.fixture(scope="session")
def trusting_backend() -> Iterator[ServerThread]:
    """A reference backend that continues from any live handle it is given (counting stale reuses):
    against it, only the service's own decision stands between a turn and a wrong reuse."""
    from service.backends.reference.config import ReferenceSettings
    from service.backends.reference.server import create_app as create_reference_app

    with ServerThread(create_reference_app(ReferenceSettings(verify_handles=False))) as server:
        yield server


@pytest.fixture
def backend_admin(reference_backend: ServerThread) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=reference_backend.url) as client:
        yield client


def wait_for_artifact(
    admin: convstate_client.Client, response_id: str, seconds: float = 15.0
) -> convstate_client.Artifact:
    """The writer stores a committed turn's ids within a bounded delay (one batch)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return admin.artifact(response_id)
        except convstate_client.ApiError as error:
            if error.status != 404 or time.monotonic() > deadline:
                raise
        time.sleep(0.05)


_DB_TIMING = re.compile(r'db;dur=[0-9.]+;desc="(\d+) statements, (\d+) round trips"')


def sql_statements(headers: Mapping[str, str]) -> int:
    """The SQL statements a request ran, from its Server-Timing header."""
    return db_counts(headers)[0]


def db_counts(headers: Mapping[str, str]) -> tuple[int, int]:
    """(statements, round trips) of a request, from its Server-Timing header."""
    match = _DB_TIMING.search(headers["server-timing"])
    assert match, headers["server-timing"]
    return int(match.group(1)), int(match.group(2))


@dataclass(frozen=True, slots=True)
class Credentials:
    """A tenant with one key of each role."""

    tenant: str
    user_key: str
    admin_key: str


def new_tenant(database_url: str, tenant: str | None = None) -> Credentials:
    """A new tenant in a migrated database, with a user key and an admin key."""
    name = tenant or f"t-{uuid.uuid4().hex[:12]}"
    user = provision_key(database_url, name, Role.USER, "tests")
    return Credentials(name, user, provision_key(database_url, name, Role.ADMIN, "tests"))


class Service:
    """The service running over HTTP, with the settings it was started with and a tenant's keys; every
    client it hands out authenticates as that tenant."""

    def __init__(self, server: ServerThread, settings: Settings, credentials: Credentials) -> None:
        self.server = server
        self.settings = settings
        self.url = server.url
        self.tenant = credentials.tenant
        self.api_key = credentials.user_key
        self.admin_key = credentials.admin_key

    @property
    def app(self) -> FastAPI:
        app = self.server.server.config.app
        assert isinstance(app, FastAPI)
        return app

    def openai(self, api_key: str | None = None) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key or self.api_key, max_retries=0)

    def http(self, api_key: str | None = None) -> httpx.Client:
        headers = {"authorization": f"Bearer {api_key or self.api_key}"}
        return httpx.Client(base_url=self.url, timeout=30, headers=headers)

    def admin(self) -> convstate_client.Client:
        return convstate_client.Client(self.url, self.admin_key)


_SHARED: dict[str, Credentials] = {}


def shared_tenant(database_url: str) -> Credentials:
    """One tenant per database for the session: services started on the same database act as the same
    tenant, like replicas of one deployment."""
    if database_url not in _SHARED:
        _SHARED[database_url] = new_tenant(database_url)
    return _SHARED[database_url]


# For a service whose database cannot be reached: keys nobody could have made.
UNPROVISIONED = Credentials("nobody", "sk-cs-unprovisioned-user", "sk-cs-unprovisioned-admin")


def start_service(database_url: str, backend_url: str, **overrides: object) -> Service:
    """The service on loopback, as the database's shared tenant."""
    return start_service_as(shared_tenant(database_url), database_url, backend_url, **overrides)


def start_service_as(
    credentials: Credentials, database_url: str, backend_url: str, **overrides: object
) -> Service:
    settings = Settings(database_url=database_url, backend_url=backend_url, **overrides)  # type: ignore[arg-type]
    return Service(ServerThread(create_app(settings)).start(), settings, credentials)


@pytest.fixture(scope="session")
def credentials(migrated_urls: dict[str, str]) -> dict[str, Credentials]:
    """The session's tenant on each dialect, shared by the services the factory starts."""
    return {dialect: shared_tenant(url) for dialect, url in migrated_urls.items()}


@pytest.fixture(scope="session")
def service_factory(
    migrated_urls: dict[str, str], reference_backend: ServerThread, credentials: dict[str, Credentials]
) -> Iterator[object]:
    """Start (and cache) one service per (dialect, settings) combination for the session."""
    running: dict[tuple[object, ...], Service] = {}

    def get(dialect: str = "postgres", **overrides: object) -> Service:
        key = (dialect, *sorted(overrides.items()))
        if key not in running:
            settings = Settings(
                database_url=migrated_urls[dialect],
                backend_url=reference_backend.url,
                **overrides,  # type: ignore[arg-type]
            )
            app = create_app(settings)
            running[key] = Service(ServerThread(app).start(), settings, credentials[dialect])
        return running[key]

    yield get
    for service in running.values():
        service.server.stop()


@pytest.fixture
def service(service_factory: object) -> Service:
    """The service in full mode on Postgres."""
    return service_factory()  # type: ignore[operator, no-any-return]


def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


@pytest.fixture
async def pg_engine(migrated_urls: dict[str, str]) -> AsyncIterator[AsyncEngine]:
    """Direct access to the Postgres database the services use (to read or doctor prefix records)."""
    engine = create_engine(migrated_urls["postgres"])
    try:
        yield engine
    finally:
        await dispose(engine)
