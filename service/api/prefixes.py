"""HTTP routes of named prefixes: POST /v1/prefixes registers one (and warms the backend up with it),
GET lists or reads them, DELETE forgets one. Requests name a prefix with `convstate_prefix`."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from pydantic import Field

from service.api.body import CheckedRoute
from service.api.deps import current_tenant
from service.api.errors import error_responses
from service.api.schemas import FunctionTool, _Strict
from service.domain.items import normalize_input
from service.domain.prefixes import Prefix
from service.errors import InvalidRequest, NotFound
from service.prefixes import Prefixes
from service.store.prefixes import StoredPrefix

router = APIRouter(
    prefix="/v1/prefixes",
    tags=["prefixes"],
    route_class=CheckedRoute,
    responses=error_responses(400, 401, 500, 503),
)

Tenant = Annotated[str, Depends(current_tenant)]
NOT_FOUND = error_responses(404)


class RegisterPrefixBody(_Strict):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]
    model: Annotated[str, Field(min_length=1, max_length=256)]
    instructions: str | None = None
    tools: list[FunctionTool] | None = None
    input: str | list[Any] = Field(default_factory=list, description="initial input items, as in a response")


async def prefixes(request: Request) -> Prefixes:
    registry: Prefixes = request.app.state.prefixes
    return registry


Registry = Annotated[Prefixes, Depends(prefixes)]


def prefix_object(stored: StoredPrefix) -> dict[str, Any]:
    prefix = stored.prefix
    return {
        "id": prefix.name,
        "object": "convstate.prefix",
        "model": prefix.model,
        "instructions": prefix.instructions,
        "tools": prefix.tools,
        "input": prefix.input,
        "prompt_tokens": stored.prompt_tokens,
        "created_at": stored.created_at,
    }


def _not_found(name: str) -> NotFound:
    return NotFound(f"No prefix named '{name}'.", param="name")


@router.post("", responses=error_responses(413, 502, 504))
async def register_prefix(body: RegisterPrefixBody, tenant: Tenant, registry: Registry) -> dict[str, Any]:
    """Register (or replace) a named prefix; the backend computes its KV now, under the tenant's salt."""
    items = [{"role": "user", "content": body.input}] if isinstance(body.input, str) else body.input
    if items:
        normalize_input(items)  # a malformed item is refused here, not by every request that uses it
    elif not body.instructions:
        raise InvalidRequest(
            "A prefix needs 'instructions' or 'input' to start requests with.",
            param="input",
            code="missing_required_parameter",
        )
    tools = [tool.model_dump(exclude_none=True) for tool in body.tools] if body.tools else None
    prefix = Prefix(body.name, body.model, body.instructions, tools, items)
    return prefix_object(await registry.register(tenant, prefix))


@router.get("")
async def list_prefixes(tenant: Tenant, registry: Registry) -> dict[str, Any]:
    return {"object": "list", "data": [prefix_object(p) for p in await registry.store.list(tenant)]}


@router.get("/{name}", responses=NOT_FOUND)
async def get_prefix(name: str, tenant: Tenant, registry: Registry) -> dict[str, Any]:
    stored = await registry.store.get(tenant, name)
    if stored is None:
        raise _not_found(name)
    return prefix_object(stored)


@router.delete("/{name}", responses=NOT_FOUND)
async def delete_prefix(name: str, tenant: Tenant, registry: Registry) -> dict[str, Any]:
    if not await registry.store.delete(tenant, name):
        raise _not_found(name)
    return {"id": name, "object": "convstate.prefix.deleted", "deleted": True}
