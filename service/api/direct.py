"""A route served without FastAPI's dependency machinery, for the one request on every turn's path.

FastAPI resolves an endpoint's parameters on each request: it solves the dependency graph (here the
caller, its tenant and the pipeline), validates each parameter, then serializes the result. On a
`cache_ref` turn that cost more of the service's CPU than planning the turn. A `DirectRoute` is routed
and documented by FastAPI like any other route, but calls its endpoint itself, with the three things the
endpoint takes: the request, the body validated against the endpoint's model, and the authenticated
caller. Errors are raised as for any route, in the same order: a malformed body (400), then a missing or
unknown key (401), then a body that does not fit the schema (400).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, get_type_hints

from fastapi import Request, Response
from pydantic import BaseModel, ValidationError
from starlette.types import ASGIApp, Receive, Scope, Send

from service.api.body import CheckedRoute, checked_request
from service.api.deps import authenticate
from service.api.errors import convstate_error_response, validation_error
from service.domain.auth import Principal
from service.errors import ConvstateError, InvalidRequest

DirectEndpoint = Callable[..., Awaitable[Response]]


def _json_content(content_type: str | None) -> bool:
    media = (content_type or "").partition(";")[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


class DirectRoute(CheckedRoute):
    """A route whose endpoint takes `request: Request, body: <a pydantic model>, caller: Caller`
    (annotated as for FastAPI, so /openapi.json documents the body) and is called with exactly those."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        endpoint: DirectEndpoint = self.endpoint
        model: type[BaseModel] = get_type_hints(endpoint)["body"]

        async def direct(request: Request) -> Response:
            request = await checked_request(request)
            sent = bool(await request.body())
            # As FastAPI reads a body: JSON only when its content type says so.
            if sent and not _json_content(request.headers.get("content-type")):
                raise InvalidRequest("Send the request body as JSON, with 'Content-Type: application/json'.")
            caller: Principal = await authenticate(request)
            if not sent:
                raise InvalidRequest("The request has no body; send a JSON object.")
            try:
                validated = model.model_validate(await request.json())
            except ValidationError as exc:
                raise validation_error(exc) from None
            return await endpoint(request=request, body=validated, caller=caller)

        return direct


LastResort = Callable[[Request, Exception], Awaitable[Response]]


class DirectDispatch:
    """ASGI middleware, in front of FastAPI's own, that hands a request for a DirectRoute to its handler
    itself. FastAPI's way there (its error, telemetry and body-limit middleware, the router's matching
    over every route, the route's request/response wrapper) cost a turn several times what this lookup
    does. The route's errors are answered as the app's handlers answer them: a ConvstateError in its
    envelope, anything else by `last_resort`, the app's handler for `Exception` (a logged 500), which
    FastAPI would have called from its outermost middleware. A path this does not know, such as one
    under a `root_path`, goes through FastAPI to the same route."""

    def __init__(self, app: ASGIApp, routes: Sequence[DirectRoute], last_resort: LastResort) -> None:
        self.app = app
        self._routes = {
            (method, route.path): (route, route.get_route_handler())
            for route in routes
            for method in route.methods or ()
        }
        self._last_resort = last_resort

    def routes(self) -> list[tuple[str, str]]:
        """The (method, path) pairs this serves."""
        return list(self._routes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        found = self._routes.get((scope["method"], scope["path"])) if scope["type"] == "http" else None
        if found is None:
            await self.app(scope, receive, send)
            return
        route, handler = found
        scope["route"] = route  # as FastAPI records it: the request metrics are labelled by its path
        request = Request(scope, receive)
        try:
            response = await handler(request)
        except ConvstateError as exc:
            response = convstate_error_response(exc)
        except Exception as exc:
            response = await self._last_resort(request, exc)
        await response(scope, receive, send)
