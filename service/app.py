"""The FastAPI application factory and its lifespan: database, backend client, background workers."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any, cast

from fastapi import APIRouter, FastAPI
from starlette.types import ASGIApp

from service import __version__
from service.api import (
    admin,
    admin_replay,
    completions,
    conversations,
    errors,
    health,
    prefixes,
    responses,
)
from service.api.direct import DirectDispatch, DirectRoute, LastResort
from service.api.middleware import RequestAccounting
from service.backends.client import BackendClient
from service.config import AuthMode, Settings, load_settings
from service.logs import AccessLog, configure_logging
from service.pipeline import Pipeline
from service.prefixes import Prefixes
from service.proxy import Proxy
from service.replay import ReplayCache
from service.store.artifacts import ArtifactStore
from service.store.conversations import ConversationStore
from service.store.db import create_engine, dispose
from service.store.events import EventStore
from service.store.inspect import InspectStore
from service.store.invalidations import InvalidationStore
from service.store.keys import KeyStore
from service.store.prefixes import PrefixStore
from service.store.replay import ReplayStore
from service.store.responses import ResponseStore
from service.store.retention import RetentionStore
from service.store.tenants import TenantStore
from service.workers.artifacts import ArtifactQueue, ArtifactWriter
from service.workers.invalidations import InvalidationWatcher
from service.workers.reaper import reap_forever
from service.workers.replay import purge_forever
from service.workers.retention import retain_forever

log = logging.getLogger("convstate")


def create_app(settings: Settings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if settings.auth is AuthMode.NONE:
            log.warning("CONVSTATE_AUTH=none: no API keys; every caller is the admin of the default tenant")
        engine = create_engine(
            settings.database_url, pool_size=settings.db_pool_size, max_overflow=settings.db_max_overflow
        )
        # The invalidation feed has a connection of its own, so a busy pool never delays it.
        feed_engine = create_engine(settings.database_url, pool_size=1, max_overflow=0)
        backend = BackendClient(settings)
        conversations = ConversationStore(engine)
        tenants = TenantStore(engine, settings.response_ttl_days)
        keys = KeyStore(engine)
        watcher = InvalidationWatcher(
            feed_engine,
            settings.invalidation_max_lag,
            on_tenant_config=tenants.forget,
            on_api_key=keys.forget,
        )
        keys.cache_trusted = watcher.fresh
        await watcher.sync()
        events = EventStore(engine)
        replay = ReplayStore(engine)
        cache = ReplayCache(settings, backend, replay)
        retention = RetentionStore(engine)
        artifacts = ArtifactStore(engine)
        queue = ArtifactQueue(settings.artifact_queue_size)
        writer = ArtifactWriter(queue, artifacts, settings.artifact_batch)
        turns = Pipeline(
            settings,
            ResponseStore(engine),
            conversations,
            tenants,
            backend,
            watcher,
            events,
            artifacts,
            queue,
            cache,
        )
        app.state.engine = engine
        app.state.pipeline = turns
        app.state.conversations = conversations
        app.state.tenants = tenants
        app.state.keys = keys
        app.state.watcher = watcher
        app.state.invalidations = InvalidationStore(engine)
        app.state.inspect = InspectStore(engine)
        app.state.retention = retention
        app.state.artifacts = artifacts
        app.state.replay = replay
        named = Prefixes(backend, tenants, PrefixStore(engine))
        app.state.prefixes = named
        app.state.proxy = Proxy(settings, backend, tenants, cache, named)
        app.state.events = events
        loop = asyncio.get_running_loop()
        workers = [
            loop.create_task(reap_forever(turns.responses, conversations, settings.reaper_interval)),
            loop.create_task(watcher.run()),
            loop.create_task(
                retain_forever(
                    retention, artifacts, events, settings.retention_interval, settings.retention_batch
                )
            ),
            loop.create_task(writer.run()),
            loop.create_task(
                purge_forever(
                    replay,
                    settings.replay_purge_interval,
                    settings.replay_max_entries,
                    settings.replay_max_bytes,
                )
            ),
        ]
        # What imports and start-up made lives as long as the process. Frozen, the collector never walks it
        # again: left in the oldest generation, it made the first full collection while serving a pause of
        # about 0.1 s (160,000 objects), and every later one as long.
        gc.collect()
        gc.freeze()
        try:
            yield
        finally:
            # Turns still running finish (within the grace period) before the workers and the pools go.
            await turns.aclose()
            for worker in workers:
                worker.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
            # The last turns' artifacts, written before the pool goes.
            await writer.flush()
            await backend.aclose()
            await dispose(engine)
            await dispose(feed_engine)
            access_log.flush()  # the last requests' lines

    access_log = AccessLog()
    app = ConvstateAPI(
        max_request_bytes=settings.max_request_bytes,
        access_log=access_log,
        title="convstate",
        version=__version__,
        lifespan=lifespan,
        # FastAPI's native OpenTelemetry checks for configured providers on every request; off, that check
        # is a flag. CONVSTATE_OPENTELEMETRY turns it on (docs/operations.md).
        telemetry=None if settings.opentelemetry else {"tracing": False, "metrics": False, "logs": False},
    )
    app.state.settings = settings
    errors.install(app)
    routers = (
        health.router,
        responses.router,
        conversations.router,
        completions.router,
        prefixes.router,
        admin.router,
        admin_replay.router,
    )
    app.include_routers(routers)
    return app


class ConvstateAPI(FastAPI):
    """FastAPI with convstate's two layers outermost: the request's accounting around everything (so the
    last-resort 500 too carries the request id and is counted), then the direct dispatch of the turn's
    route (api/direct.py), in front of FastAPI's own middleware."""

    def __init__(self, *, max_request_bytes: int, access_log: AccessLog, **options: Any) -> None:
        super().__init__(**options)
        self.max_request_bytes = max_request_bytes
        self.access_log = access_log
        self._direct: list[DirectRoute] = []

    def include_routers(self, routers: Sequence[APIRouter]) -> None:
        """Include each router, and note its direct routes (the app keeps an included router whole, so
        they are found here, not among the app's routes)."""
        for router in routers:
            self.include_router(router)
            self._direct.extend(route for route in router.routes if isinstance(route, DirectRoute))

    def build_middleware_stack(self) -> ASGIApp:
        last_resort = cast(LastResort, self.exception_handlers[Exception])
        dispatch = DirectDispatch(super().build_middleware_stack(), self._direct, last_resort)
        return RequestAccounting(dispatch, self.max_request_bytes, self.access_log)


def app_from_environment() -> FastAPI:
    """The app of one uvicorn worker process when `convstate serve` runs several."""
    settings = load_settings()
    configure_logging(settings.log_level)
    return create_app(settings)
