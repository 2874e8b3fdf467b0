"""HTTP routes of the caching proxy: POST /v1/chat/completions and /v1/completions (service/proxy.py).

Bodies pass through as the client wrote them (the backend validates its own fields); only what the
proxy itself relies on is checked here, before any backend call. A streamed reply is Server-Sent
Events as vLLM sends them; a failure after the first event ends the stream with an error event, then
`[DONE]`, as vLLM reports a failure inside generation."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from service.api.body import CheckedRoute
from service.api.deps import current_tenant
from service.api.errors import envelope, error_responses
from service.api.json import JSONBody
from service.domain.prefixes import EXTENSION as PREFIX
from service.domain.replay import HEADER, Endpoint
from service.errors import ConvstateError, InvalidRequest
from service.proxy import Answer, Proxy

router = APIRouter(
    prefix="/v1",
    tags=["completions"],
    route_class=CheckedRoute,
    responses=error_responses(400, 401, 413, 500, 502, 503, 504),
)

Tenant = Annotated[str, Depends(current_tenant)]
KEY_HEADER = "x-convstate-cache-key"
_STREAMED: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The backend's reply; with `stream: true`, its chunks as Server-Sent Events. "
        "`x-convstate-cache` says how the replay cache answered it",
        "content": {"text/event-stream": {}},
    }
}


async def proxy(request: Request) -> Proxy:
    serving: Proxy = request.app.state.proxy
    return serving


@router.post("/chat/completions", response_model=None, responses=_STREAMED)
async def chat_completions(
    request: Request, tenant: Tenant, serving: Annotated[Proxy, Depends(proxy)]
) -> JSONBody | StreamingResponse:
    return await _proxied(request, tenant, serving, Endpoint.CHAT)


@router.post("/completions", response_model=None, responses=_STREAMED)
async def completions(
    request: Request, tenant: Tenant, serving: Annotated[Proxy, Depends(proxy)]
) -> JSONBody | StreamingResponse:
    return await _proxied(request, tenant, serving, Endpoint.COMPLETIONS)


async def _proxied(
    request: Request, tenant: str, serving: Proxy, endpoint: Endpoint
) -> JSONBody | StreamingResponse:
    body = check_body(endpoint, await request.json())
    answer = await serving.serve(
        tenant, endpoint, body, request.headers.get(HEADER), request.state.request_id
    )
    headers = _headers(answer)
    if answer.chunks is not None:
        return StreamingResponse(
            _sse(answer.chunks),
            media_type="text/event-stream",
            headers={**headers, "cache-control": "no-cache"},
        )
    return JSONBody(answer.body, headers=headers)


def check_body(endpoint: Endpoint, body: Any) -> dict[str, Any]:
    """What the proxy needs of a body; the rest is the backend's to judge."""
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise InvalidRequest(
            "'model' is required and must be a string.", param="model", code="missing_required_parameter"
        )
    if endpoint is Endpoint.CHAT:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise InvalidRequest(
                "'messages' is required and must be a non-empty array.",
                param="messages",
                code="missing_required_parameter",
            )
    elif not isinstance(body.get("prompt"), (str, list)):
        raise InvalidRequest(
            "'prompt' is required and must be a string or an array.",
            param="prompt",
            code="missing_required_parameter",
        )
    if "stream" in body and not isinstance(body["stream"], bool) and body["stream"] is not None:
        raise InvalidRequest("'stream' must be a boolean.", param="stream", code="invalid_type")
    if PREFIX in body and (endpoint is not Endpoint.CHAT or not isinstance(body[PREFIX], str)):
        raise InvalidRequest(
            f"'{PREFIX}' names a prefix (a string), on chat completions only.",
            param=PREFIX,
            code="invalid_value",
        )
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise InvalidRequest(
            "'stream_options' must be an object.", param="stream_options", code="invalid_type"
        )

    return body


def _headers(answer: Answer) -> dict[str, str]:
    headers = {HEADER: answer.cache}
    if answer.key is not None:
        headers[KEY_HEADER] = answer.key
    return headers


async def _sse(chunks: AsyncIterator[dict[str, Any]]) -> AsyncIterator[bytes]:
    try:
        async for chunk in chunks:
            yield b"data: " + orjson.dumps(chunk) + b"\n\n"
    except ConvstateError as exc:
        yield b"data: " + orjson.dumps(envelope(exc.message, exc.type, exc.param, exc.code)) + b"\n\n"
    yield b"data: [DONE]\n\n"
