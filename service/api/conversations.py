"""HTTP routes of the Conversations API: conversations and their items."""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query

from service.api.body import CheckedRoute
from service.api.deps import conversations, current_tenant
from service.api.errors import error_responses
from service.api.json import JSONBody
from service.api.objects import conversation_object, list_object
from service.api.schemas import (
    CONVERSATION_ID_PATTERN,
    AddConversationItemsBody,
    ConversationItemsQuery,
    CreateConversationBody,
    IncludeQuery,
    UpdateConversationBody,
)
from service.domain.items import Item, normalize_input
from service.errors import InvalidRequest, NotFound
from service.store.conversations import ConversationStore

router = APIRouter(
    prefix="/v1/conversations",
    tags=["conversations"],
    route_class=CheckedRoute,
    responses=error_responses(400, 401, 500, 503),
)

Tenant = Annotated[str, Depends(current_tenant)]
Store = Annotated[ConversationStore, Depends(conversations)]
ConversationId = Annotated[str, Path(pattern=CONVERSATION_ID_PATTERN)]
# Accepted and validated; nothing they would add (logprobs, encrypted reasoning, ...) is stored.
Include = Annotated[IncludeQuery, Query()]


def _not_found(conversation_id: str) -> NotFound:
    return NotFound(f"No conversation found with id '{conversation_id}'.", param="conversation_id")


def _items(raw: list[Any]) -> list[Item]:
    """Validate and normalize like Responses input, with errors naming `items` instead of `input`."""
    try:
        return normalize_input(raw)
    except InvalidRequest as exc:
        param = None if exc.param is None else "items" + exc.param.removeprefix("input")
        raise InvalidRequest(exc.message.replace("'input", "'items"), param=param, code=exc.code) from None


@router.post("", responses=error_responses(413))
async def create_conversation(
    tenant: Tenant, store: Store, body: CreateConversationBody | None = None
) -> JSONBody:
    body = body or CreateConversationBody()
    items = _items(body.items) if body.items else []
    created = await store.create(tenant, metadata=body.metadata or {}, items=items, now=time.time())
    return JSONBody(conversation_object(created))


@router.get("/{conversation_id}", responses=error_responses(404))
async def get_conversation(conversation_id: ConversationId, tenant: Tenant, store: Store) -> JSONBody:
    conversation = await store.get(tenant, conversation_id)
    if conversation is None:
        raise _not_found(conversation_id)
    return JSONBody(conversation_object(conversation))


@router.post("/{conversation_id}", responses=error_responses(404, 413))
async def update_conversation(
    conversation_id: ConversationId, body: UpdateConversationBody, tenant: Tenant, store: Store
) -> JSONBody:
    conversation = await store.update_metadata(tenant, conversation_id, body.metadata or {})
    if conversation is None:
        raise _not_found(conversation_id)
    return JSONBody(conversation_object(conversation))


@router.delete("/{conversation_id}", responses=error_responses(404))
async def delete_conversation(conversation_id: ConversationId, tenant: Tenant, store: Store) -> JSONBody:
    if not await store.delete(tenant, conversation_id, time.time()):
        raise _not_found(conversation_id)
    return JSONBody({"id": conversation_id, "object": "conversation.deleted", "deleted": True})


@router.post("/{conversation_id}/items", responses=error_responses(404, 413))
async def add_items(
    conversation_id: ConversationId,
    body: AddConversationItemsBody,
    tenant: Tenant,
    store: Store,
    _include: Include,
) -> JSONBody:
    items = _items(body.items)
    if not await store.add_items(tenant, conversation_id, items, time.time()):
        raise _not_found(conversation_id)
    return JSONBody(list_object(items, False))


@router.get("/{conversation_id}/items", responses=error_responses(404))
async def list_items(
    conversation_id: ConversationId,
    tenant: Tenant,
    store: Store,
    query: Annotated[ConversationItemsQuery, Query()],
) -> JSONBody:
    page = await store.list_items(
        tenant, conversation_id, after=query.after, limit=query.limit, descending=query.order == "desc"
    )
    if page is None:
        raise _not_found(conversation_id)
    has_more, items = page
    return JSONBody(list_object(items, has_more))


@router.get("/{conversation_id}/items/{item_id}", responses=error_responses(404))
async def get_item(
    conversation_id: ConversationId, item_id: str, tenant: Tenant, store: Store, _include: Include
) -> JSONBody:
    item = await store.get_item(tenant, conversation_id, item_id)
    if item is None:
        raise _not_found(conversation_id)
    return JSONBody(item)


@router.delete("/{conversation_id}/items/{item_id}", responses=error_responses(404))
async def delete_item(
    conversation_id: ConversationId, item_id: str, tenant: Tenant, store: Store
) -> JSONBody:
    conversation = await store.delete_item(tenant, conversation_id, item_id, time.time())
    if conversation is None:
        raise _not_found(conversation_id)
    return JSONBody(conversation_object(conversation))
