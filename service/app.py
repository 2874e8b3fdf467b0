"""The FastAPI application factory and its lifespan: database, backend client, background workers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from service import __version__
from service.api import conversations, errors, health, responses
from service.api.middleware import RequestAccounting
from service.backends.client import BackendClient
from service.config import Settings, load_settings
from service.logs import configure_logging
from service.pipeline import Pipeline
from service.store.conversations import ConversationStore
from service.store.db import create_engine
from service.store.responses import ResponseStore
from service.store.tenants import TenantStore
from service.workers.reaper import reap_forever


def create_app(settings: Settings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = create_engine(
            settings.database_url, pool_size=settings.db_pool_size, max_overflow=settings.db_max_overflow
        )
        backend = BackendClient(settings)
        conversations = ConversationStore(engine)
        turns = Pipeline(settings, ResponseStore(engine), conversations, TenantStore(engine), backend)
        app.state.engine = engine
        app.state.pipeline = turns
        app.state.conversations = conversations
        reaper = asyncio.get_running_loop().create_task(
            reap_forever(turns.responses, conversations, settings.reaper_interval)
        )
        try:
            yield
        finally:
            # Turns still running finish (within the grace period) before the reaper and the pools go.
            await turns.aclose()
            reaper.cancel()
            await backend.aclose()
            await engine.dispose()

    app = FastAPI(title="convstate", version=__version__, lifespan=lifespan)
    app.state.settings = settings
    errors.install(app)
    app.add_middleware(RequestAccounting, max_request_bytes=settings.max_request_bytes)
    app.include_router(health.router)
    app.include_router(responses.router)
    app.include_router(conversations.router)
    return app


def app_from_environment() -> FastAPI:
    """The app of one uvicorn worker process when `convstate serve` runs several."""
    settings = load_settings()
    configure_logging(settings.log_level)
    return create_app(settings)
