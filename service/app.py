"""The FastAPI application factory and its lifespan: database, backend client, background workers."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from service import __version__
from service.api import errors, health, responses
from service.api.middleware import RequestAccounting
from service.backends.client import BackendClient
from service.config import Settings
from service.pipeline import Pipeline
from service.store.db import create_engine
from service.store.responses import ResponseStore
from service.store.tenants import TenantStore


def create_app(settings: Settings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = create_engine(
            settings.database_url, pool_size=settings.db_pool_size, max_overflow=settings.db_max_overflow
        )
        backend = BackendClient(settings)
        turns = Pipeline(settings, ResponseStore(engine), TenantStore(engine), backend)
        app.state.engine = engine
        app.state.pipeline = turns
        try:
            yield
        finally:
            await turns.aclose()
            await backend.aclose()
            await engine.dispose()

    app = FastAPI(title="convstate", version=__version__, lifespan=lifespan)
    app.state.settings = settings
    errors.install(app)
    app.add_middleware(RequestAccounting)
    app.include_router(health.router)
    app.include_router(responses.router)
    return app
