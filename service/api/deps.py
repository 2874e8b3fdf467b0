"""FastAPI dependencies: the per-process objects the lifespan builds, and the caller's tenant.

Async on purpose: FastAPI runs plain functions in its threadpool, a hop that costs more than they do."""

from __future__ import annotations

from fastapi import Request

from service.pipeline import Pipeline
from service.store.conversations import ConversationStore
from service.store.responses import ResponseStore

DEFAULT_TENANT = "default"


async def pipeline(request: Request) -> Pipeline:
    turns: Pipeline = request.app.state.pipeline
    return turns


async def response_store(request: Request) -> ResponseStore:
    store: ResponseStore = request.app.state.pipeline.responses
    return store


async def conversations(request: Request) -> ConversationStore:
    store: ConversationStore = request.app.state.conversations
    return store


async def current_tenant() -> str:
    # API keys arrive with the security work; until then every caller is the default tenant.
    return DEFAULT_TENANT
