"""HTTP routes of the Responses API."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Query, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import StreamingResponse
from pydantic import ValidationError

from service import observe
from service.api.body import CheckedRoute, parse_json
from service.api.deps import Caller, authenticate, current_tenant, pipeline, response_store
from service.api.direct import DirectRoute
from service.api.errors import convstate_error_response, error_responses, validation_error
from service.api.json import JSONBody
from service.api.middleware import new_request_id
from service.api.objects import list_object, response_object
from service.api.schemas import (
    UNSUPPORTED_FIELDS,
    CompactBody,
    ConversationRef,
    CreateResponseBody,
    ListQuery,
)
from service.domain.items import normalize_input
from service.domain.prefixes import apply_to_responses
from service.domain.replay import HEADER, CachePolicy, Mode, cache_policy
from service.errors import Conflict, ConvstateError, InvalidRequest, NotFound
from service.pipeline import ECHOED_SETTINGS, Pipeline, TurnRequest, UnstoredTurn
from service.store.responses import ResponseStore, StoredResponse

router = APIRouter(
    prefix="/v1/responses",
    tags=["responses"],
    route_class=CheckedRoute,
    responses=error_responses(400, 401, 500, 503),
)

Tenant = Annotated[str, Depends(current_tenant)]


def _not_found(response_id: str) -> NotFound:
    return NotFound(f"No response found with id '{response_id}'.", param="response_id")


def turn_request(
    body: CreateResponseBody,
    request_id: str | None,
    max_items: int,
    unstored_parent: UnstoredTurn | None = None,
) -> TurnRequest:
    for name in UNSUPPORTED_FIELDS:
        if getattr(body, name) is not None:
            raise InvalidRequest(
                f"'{name}' is not supported by this server.", param=name, code="unsupported_parameter"
            )
    if body.background and not body.store:
        raise InvalidRequest("background responses require store=true.", param="background")
    if isinstance(body.input, list) and len(body.input) > max_items:
        raise InvalidRequest(
            f"'input' may hold at most {max_items} items.", param="input", code="too_many_items"
        )
    conversation = (
        body.conversation.id if isinstance(body.conversation, ConversationRef) else body.conversation
    )
    if conversation is not None and body.previous_response_id is not None:
        raise InvalidRequest(
            "Mutually exclusive parameters: provide 'previous_response_id' or 'conversation', not both.",
            param="conversation",
            code="mutually_exclusive_parameters",
        )
    if conversation is not None and not body.store:
        raise InvalidRequest("A response in a conversation must be stored (store=true).", param="store")
    dumped = body.model_dump(exclude_none=True, by_alias=True)
    settings = {key: dumped[key] for key in ECHOED_SETTINGS if key in dumped}
    return TurnRequest(
        model=body.model,
        input=normalize_input(body.input),
        instructions=body.instructions,
        previous_response_id=body.previous_response_id,
        store=body.store,
        settings=settings,
        background=body.background,
        request_id=request_id,
        conversation_id=conversation,
        unstored_parent=unstored_parent,
    )


def sse_payload(event: dict[str, Any]) -> bytes:
    """An event's JSON, with any stored response rendered as the public object."""
    response = event.get("response")
    if isinstance(response, StoredResponse):
        event = {**event, "response": response_object(response)}
    return orjson.dumps(event)


def sse_frame(event: dict[str, Any]) -> bytes:
    """One whole Server-Sent Event, LF line endings, `event:` equal to the body's type."""
    kind: str = event["type"]
    return b"event: " + kind.encode() + b"\ndata: " + sse_payload(event) + b"\n\n"


async def _sse(events: AsyncIterator[dict[str, Any]]) -> AsyncIterator[bytes]:
    async for event in events:
        yield sse_frame(event)


# A streamed response is Server-Sent Events; the backend's failures are 502, 503 and 504.
_TURN_RESPONSES = {
    200: {
        "description": "The response object; with `stream: true`, its events as Server-Sent Events",
        "content": {"text/event-stream": {}},
    },
    **error_responses(413, 502, 504),
}


async def create_response(
    request: Request, body: CreateResponseBody, caller: Caller
) -> JSONBody | StreamingResponse:
    tenant = caller.tenant
    turns: Pipeline = request.app.state.pipeline
    if body.convstate_prefix is not None:
        body = await with_prefix(request, tenant, body.convstate_prefix)
    turn = turn_request(body, request.state.request_id, request.app.state.settings.max_input_items)
    if body.stream:
        stream = await turns.stream(tenant, turn)
        return StreamingResponse(
            _sse(stream.events()),
            media_type="text/event-stream",
            headers={"x-convstate-decision": stream.decision.header, "cache-control": "no-cache"},
        )
    turn.replay = await replay_policy(request, tenant, turn)
    result = await turns.create(tenant, turn)
    headers = {"x-convstate-decision": result.decision.header}
    stats = observe.current.get()
    if stats is not None and stats.cache is not None:
        headers[HEADER] = stats.cache
    if result.prompt_digest:
        headers["x-convstate-prompt-digest"] = result.prompt_digest
    headers["x-convstate-bytes-sent"] = str(result.bytes_sent)
    return JSONBody(response_object(result.response), headers=headers)


# Every turn comes through here: a DirectRoute (service/api/direct.py) spares it FastAPI's dependency
# machinery.
router.add_api_route(
    "",
    create_response,
    methods=["POST"],
    response_model=None,
    responses={**_TURN_RESPONSES, **error_responses(404)},
    route_class_override=DirectRoute,
)


async def with_prefix(request: Request, tenant: str, name: str) -> CreateResponseBody:
    """The request's body as sent, with its named prefix applied (domain/prefixes.py)."""
    prefix = await request.app.state.prefixes.named(tenant, name)
    try:
        return CreateResponseBody.model_validate(apply_to_responses(await request.json(), prefix))
    except ValidationError as exc:
        raise validation_error(exc) from None


async def replay_policy(request: Request, tenant: str, turn: TurnRequest) -> CachePolicy | None:
    """A turn answered whole in the foreground goes through the replay cache when its header or its
    tenant's default says so (streamed and background turns do not)."""
    header = request.headers.get(HEADER)
    if turn.background:
        return None
    opted_in = header is None and (await request.app.state.tenants.current(tenant)).replay_cache
    policy = cache_policy(header, None, opted_in)
    return None if policy.mode is Mode.BYPASS else policy


# Fields of a `response.create` frame that only steer the socket, not the response.
_SOCKET_ONLY_FIELDS = ("type", "stream", "stream_options", "stream_id", "generate")


def _socket_error(exc: ConvstateError, stream_id: str | None) -> dict[str, Any]:
    event: dict[str, Any] = {
        "type": "error",
        "status": exc.status,
        # The specification requires a string code; an error without its own code is named by its type.
        "error": {"type": exc.type, "code": exc.code or exc.type, "message": exc.message, "param": exc.param},
    }
    if stream_id is not None:
        event["stream_id"] = stream_id
    return event


def origin_allowed(origin: str | None, host: str | None, allowed: frozenset[str]) -> bool:
    """A browser page may open the socket if its origin is listed (or * is), or, with no list, if it
    was served from the host the socket is opened on. No Origin: not a browser, nothing to check."""
    if origin is None:
        return True
    origin = origin.rstrip("/").lower()
    if allowed:
        return "*" in allowed or origin in allowed
    return host is not None and origin.split("://", 1)[-1] == host.lower()


class ConnectionResponses:
    """The `store: false` responses of one WebSocket connection, most recently used last, at most
    `size`: as with OpenAI, `previous_response_id` continues them on this connection only. Their
    histories share the items they have in common."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._kept: OrderedDict[str, UnstoredTurn] = OrderedDict()

    def get(self, response_id: str | None) -> UnstoredTurn | None:
        kept = self._kept.get(response_id) if response_id is not None else None
        if kept is not None:
            self._kept.move_to_end(kept.response.id)
        return kept

    def keep(self, turn: UnstoredTurn) -> None:
        self._kept[turn.response.id] = turn
        while len(self._kept) > self.size:
            self._kept.popitem(last=False)

    def forget(self, response_id: str | None) -> None:
        """A continuation of it failed: its state is not offered again."""
        if response_id is not None:
            self._kept.pop(response_id, None)


@router.websocket("")
async def responses_socket(websocket: WebSocket) -> None:
    """The Responses WebSocket mode: `response.create` frames in, the streaming events of each response
    out, one response at a time on a connection."""
    turns: Pipeline = websocket.app.state.pipeline
    settings = websocket.app.state.settings
    headers = websocket.headers
    if not origin_allowed(headers.get("origin"), headers.get("host"), settings.websocket_origins):
        await websocket.close(code=1008)  # before accept: the upgrade is answered 403
        return
    try:
        tenant = (await authenticate(websocket)).tenant
    except ConvstateError as exc:
        # Refused in the handshake, with the same status and envelope as an HTTP request.
        await websocket.send_denial_response(convstate_error_response(exc))
        return
    await websocket.accept()
    kept = ConnectionResponses(settings.websocket_cached_responses)
    while True:
        try:
            frame = await websocket.receive_text()
        except WebSocketDisconnect:
            return
        stream_id: str | None = None
        previous: str | None = None
        try:
            event = parse_json(frame)
            if not isinstance(event, dict) or event.get("type") != "response.create":
                raise InvalidRequest("Expected a JSON object with type 'response.create'.", param="type")
            stream_id = event.get("stream_id")
            fields = {key: value for key, value in event.items() if key not in _SOCKET_ONLY_FIELDS}
            try:
                body = CreateResponseBody.model_validate(fields)
            except ValidationError as exc:
                raise validation_error(exc) from None
            request_id = new_request_id()
            previous = body.previous_response_id
            request = turn_request(body, request_id, settings.max_input_items, kept.get(previous))
            stream = await turns.stream(tenant, request)
            async for outgoing in stream.events():
                if outgoing["type"] == "response.failed":
                    kept.forget(previous)
                if stream_id is not None:
                    outgoing = {**outgoing, "stream_id": stream_id}
                await websocket.send_bytes(sse_payload(outgoing))
            if stream.unstored is not None:
                kept.keep(stream.unstored)
        except ConvstateError as exc:
            kept.forget(previous)
            await websocket.send_bytes(orjson.dumps(_socket_error(exc, stream_id)))
        except WebSocketDisconnect:
            return


@router.get(
    "/{response_id}",
    response_model=None,
    responses={
        200: {
            "description": "The response object; with `stream=true`, its events as Server-Sent Events",
            "content": {"text/event-stream": {}},
        },
        **error_responses(404),
    },
)
async def get_response(
    response_id: str,
    tenant: Tenant,
    turns: Annotated[Pipeline, Depends(pipeline)],
    stream: bool = False,
    starting_after: Annotated[int | None, Query(ge=-1, le=2**31 - 1)] = None,
) -> JSONBody | StreamingResponse:
    stored = await turns.responses.get(tenant, response_id)
    if stored is None:
        raise _not_found(response_id)
    if not stream:
        return JSONBody(response_object(stored))
    if await turns.background.events.last(tenant, response_id) is None:
        # Refused loudly: answered as JSON, the SDK's retrieve(stream=True) would yield no events at all.
        raise InvalidRequest(
            "Only a response created with background=true and stream=true can be streamed again; "
            "retrieve it without 'stream'.",
            param="stream",
            code="unsupported_value",
        )
    after = -1 if starting_after is None else starting_after
    return StreamingResponse(
        _sse(turns.background.follow(tenant, response_id, after)),
        media_type="text/event-stream",
        headers={"cache-control": "no-cache"},
    )


@router.delete("/{response_id}", responses=error_responses(404))
async def delete_response(
    response_id: str, tenant: Tenant, store: Annotated[ResponseStore, Depends(response_store)]
) -> JSONBody:
    if not await store.delete(tenant, response_id, time.time()):
        raise _not_found(response_id)
    return JSONBody({"id": response_id, "object": "response.deleted", "deleted": True})


@router.post("/compact", responses=error_responses(413, 502, 504))
async def compact_response(
    body: CompactBody, request: Request, tenant: Tenant, turns: Annotated[Pipeline, Depends(pipeline)]
) -> JSONBody:
    if not body.input and body.previous_response_id is None:
        raise InvalidRequest("Provide 'input', 'previous_response_id' or both.", param="input")
    compaction = await turns.compact(
        tenant,
        TurnRequest(
            model=body.model,
            input=normalize_input(body.input) if body.input else [],
            instructions=body.instructions,
            previous_response_id=body.previous_response_id,
            store=True,
            settings={},
            request_id=request.state.request_id,
        ),
    )
    return JSONBody(
        {
            "id": compaction.id,
            "object": "response.compaction",
            "created_at": int(compaction.created_at),
            "output": compaction.output,
            "usage": compaction.usage,
        }
    )


@router.post("/{response_id}/cancel", responses=error_responses(404, 409))
async def cancel_response(
    response_id: str, tenant: Tenant, store: Annotated[ResponseStore, Depends(response_store)]
) -> JSONBody:
    stored = await store.get(tenant, response_id)
    if stored is None:
        raise _not_found(response_id)
    if not stored.background:
        raise InvalidRequest(
            "Responses can only be cancelled if they were created with background=true.", param="response_id"
        )
    # The status after the conditional cancel is the truth: cancelled (now or before), or the final
    # status of a response that finished first, even if it finished while this request waited.
    after = await store.cancel(tenant, response_id, time.time())
    if after is None:
        raise _not_found(response_id)
    if after.status != "cancelled":
        raise Conflict(
            f"Cannot cancel a response whose status is '{after.status}'.",
            param="response_id",
            code="response_not_cancellable",
        )
    return JSONBody(response_object(after))


@router.get("/{response_id}/input_items", responses=error_responses(404))
async def list_input_items(
    response_id: str,
    tenant: Tenant,
    store: Annotated[ResponseStore, Depends(response_store)],
    query: Annotated[ListQuery, Query()],
) -> JSONBody:
    page = await store.input_items(
        tenant, response_id, after=query.after, limit=query.limit, descending=query.order == "desc"
    )
    if page is None:
        raise _not_found(response_id)
    has_more, items = page
    return JSONBody(list_object(items, has_more))
