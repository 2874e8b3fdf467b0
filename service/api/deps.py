"""FastAPI dependencies: the per-process objects the lifespan builds, and who the caller is.

Async on purpose: FastAPI runs plain functions in its threadpool, a hop that costs more than they do."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from starlette.requests import HTTPConnection

from service.config import AuthMode
from service.domain.auth import Principal, Role
from service.errors import Forbidden, Unauthorized
from service.pipeline import Pipeline
from service.store.conversations import ConversationStore
from service.store.keys import KeyStore
from service.store.responses import ResponseStore

DEFAULT_TENANT = "default"
# With CONVSTATE_AUTH=none every caller is this: the admin of the default tenant.
_NOBODY = Principal(DEFAULT_TENANT, Role.ADMIN, None)


async def pipeline(request: Request) -> Pipeline:
    turns: Pipeline = request.app.state.pipeline
    return turns


async def response_store(request: Request) -> ResponseStore:
    store: ResponseStore = request.app.state.pipeline.responses
    return store


async def conversations(request: Request) -> ConversationStore:
    store: ConversationStore = request.app.state.conversations
    return store


async def authenticate(connection: HTTPConnection) -> Principal:
    """The caller of a request or WebSocket, from `Authorization: Bearer <key>`: 401 without a valid key."""
    if connection.app.state.settings.auth is AuthMode.NONE:
        return _NOBODY
    scheme, _, secret = connection.headers.get("authorization", "").partition(" ")
    secret = secret.strip()
    if scheme.lower() != "bearer" or not secret:
        raise Unauthorized(
            "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'.", code="missing_api_key"
        )
    keys: KeyStore = connection.app.state.keys
    principal = await keys.authenticate(secret)
    if principal is None:
        raise Unauthorized("Incorrect API key provided.", code="invalid_api_key")
    return principal


async def principal(request: Request) -> Principal:
    return await authenticate(request)


Caller = Annotated[Principal, Depends(principal)]


async def current_tenant(caller: Caller) -> str:
    """The tenant every store query of the request is scoped to."""
    return caller.tenant


async def admin(caller: Caller) -> Principal:
    if caller.role is not Role.ADMIN:
        raise Forbidden("This endpoint needs an admin key.", code="admin_required")
    return caller
