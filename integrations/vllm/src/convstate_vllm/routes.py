"""The plugin's HTTP surface: `GET /v1/models` and `POST /v1/chat/completions`, replacing vLLM's routes.

A chat request without `prompt_cache` goes to vLLM's own route untouched. With it, the plugin builds
the prompt (continued from a handle, or rendered in full when a handle is asked for), hands the token
ids to vLLM's chat handler in `kv_transfer_params.prompt_token_ids`, and adds to the reply the digest of
the prompt token ids the engine reports and, when asked, the new handle. To learn those ids it always
asks the engine for them (`return_token_ids`), and removes them again when the caller did not.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from http import HTTPStatus
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from vllm.entrypoints.openai.chat_completion.api_router import (
    ENDPOINT_LOAD_METRICS_FORMAT_HEADER_LABEL,
)
from vllm.entrypoints.openai.chat_completion.api_router import (
    create_chat_completion as vllm_chat_completion,
)
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest, ChatCompletionResponse
from vllm.entrypoints.serve import create_error_response
from vllm.entrypoints.serve.engine.protocol import ErrorResponse
from vllm.entrypoints.serve.utils.api_utils import (
    load_aware_call,
    should_include_usage,
    validate_json_request,
    with_cancellation,
)
from vllm.entrypoints.serve.utils.orca_metrics import metrics_header
from vllm.entrypoints.serve.utils.sse_keep_alive import with_sse_keep_alive

from convstate_vllm.cache import PromptCache, Turn, reply_message
from convstate_vllm.digest import token_digest
from convstate_vllm.protocol import BadPromptCache, CacheRequest, Miss, parse_cache_request

log = logging.getLogger("vllm.plugins.convstate")

router = APIRouter()
STATE_KEY = "convstate_prompt_cache"


def prompt_cache(raw_request: Request) -> PromptCache | None:
    cache: PromptCache | None = getattr(raw_request.app.state, STATE_KEY, None)
    return cache


@router.get("/v1/models")
async def show_available_models(raw_request: Request) -> JSONResponse:
    listed = await raw_request.app.state.openai_serving_models.show_available_models()
    body = listed.model_dump()
    cache = prompt_cache(raw_request)
    for card in body["data"] if cache is not None else []:
        extension = cache.card(card["id"]) if cache is not None else None
        if extension is not None:
            card["prompt_cache"] = extension
    return JSONResponse(content=body)


@router.post(
    "/v1/chat/completions",
    dependencies=[Depends(validate_json_request)],
    responses={
        HTTPStatus.OK.value: {"content": {"text/event-stream": {}}},
        HTTPStatus.BAD_REQUEST.value: {"model": ErrorResponse},
        HTTPStatus.NOT_FOUND.value: {"model": ErrorResponse},
        HTTPStatus.CONFLICT.value: {"description": "prompt_cache_miss: resend with the whole history"},
        HTTPStatus.INTERNAL_SERVER_ERROR.value: {"model": ErrorResponse},
        HTTPStatus.NOT_IMPLEMENTED.value: {"model": ErrorResponse},
    },
)
async def create_chat_completion(request: ChatCompletionRequest, raw_request: Request) -> Any:
    raw = request.model_extra.pop("prompt_cache", None) if request.model_extra else None
    if raw is None:
        return await vllm_chat_completion(request, raw_request)
    try:
        cache_request = parse_cache_request(raw)
    except BadPromptCache as exc:
        return _bad(exc)
    cache = prompt_cache(raw_request)
    if cache is None:
        if cache_request.ref is not None or cache_request.seed is not None:
            # Never generate from the new messages alone.
            return _miss(Miss("unknown_ref", "this server keeps no prompt cache"))
        return await vllm_chat_completion(request, raw_request)
    return await _guarded(request, raw_request, cache, cache_request)


def _bad(exc: BadPromptCache) -> JSONResponse:
    error = create_error_response(str(exc), param="prompt_cache")
    return JSONResponse(content=error.model_dump(), status_code=error.error.code)


def _miss(miss: Miss) -> JSONResponse:
    log.info("convstate: prompt cache miss %s", miss)
    return JSONResponse(content=miss.body(), status_code=HTTPStatus.CONFLICT)


async def _with_prompt_cache(
    request: ChatCompletionRequest, raw_request: Request, cache: PromptCache, cache_request: CacheRequest
) -> Response:
    handler = raw_request.app.state.openai_serving_chat
    turn: Turn | None = None
    if cache_request.ref is not None or cache_request.seed is not None:
        try:
            turn = await cache.continue_from(request, cache_request, handler)
        except Miss as miss:
            return _miss(miss)
        except BadPromptCache as exc:
            return _bad(exc)
    elif cache_request.register:
        turn = await cache.render_full(request)
    if turn is not None:
        request.kv_transfer_params = {"prompt_token_ids": list(turn.ids)}
    reply = _Reply(cache, turn, request, register=cache_request.register and (request.n or 1) == 1)
    request.return_token_ids = True

    if handler is None:
        raise NotImplementedError("The model does not support Chat Completions API")
    generator = await handler.create_chat_completion(request, raw_request)
    if isinstance(generator, ErrorResponse):
        return JSONResponse(content=generator.model_dump(), status_code=generator.error.code)
    if isinstance(generator, ChatCompletionResponse):
        body = await reply.whole(generator.model_dump())
        headers = dict(
            metrics_header(raw_request.headers.get(ENDPOINT_LOAD_METRICS_FORMAT_HEADER_LABEL, "")) or {}
        )
        headers["x-prompt-digest"] = body["prompt_digest"]
        return JSONResponse(content=body, headers=headers)
    include_usage, _ = should_include_usage(request.stream_options, handler.enable_force_include_usage)
    interval = float(getattr(getattr(raw_request.app.state, "args", None), "sse_keep_alive_interval", 0))
    return StreamingResponse(
        content=with_sse_keep_alive(reply.stream(generator, include_usage), interval),
        media_type="text/event-stream",
    )


# As vLLM guards its own route: cancelled when the client goes away, counted in the server's load.
_guarded: Any = with_cancellation(load_aware_call(_with_prompt_cache))


class _Reply:
    """One reply on its way out: the prompt digest, the handle, and the token ids the caller did not ask for
    taken out again."""

    def __init__(self, cache: PromptCache, turn: Turn | None, request: Any, *, register: bool) -> None:
        self.cache, self.turn, self.request = cache, turn, request
        self.register = register and turn is not None
        self.wants_ids = bool(request.return_token_ids)
        self.digest: str | None = None
        self._content: list[str] = []
        self._reasoning: list[str] = []
        self._calls: dict[int, dict[str, Any]] = {}

    def _prompt_ids(self, carrier: dict[str, Any]) -> None:
        """Note the prompt ids the engine reports in `carrier` (a body or chunk), and leave in it what the
        caller asked for: none; or, after a ref, only those past the handle's part of the registering
        prompt, which the caller has (`prompt_token_ids_start`), so the reply does not grow with the
        conversation; else all."""
        ids = carrier["prompt_token_ids"]
        self.digest = token_digest(ids)
        if self.turn is not None and ids != self.turn.ids:
            # The engine did not run the prompt the plugin built: never hand out a handle for it.
            log.error("convstate: the engine ran other prompt token ids than the plugin built; no handle")
            self.register = False
        start = self.turn.reported_from if self.turn is not None else 0
        if not self.wants_ids:
            # Set to null, not removed: vLLM sends them as null when they were not asked for.
            carrier["prompt_token_ids"] = None
        elif start:
            carrier["prompt_token_ids"] = ids[start:]
            carrier["prompt_token_ids_start"] = start

    async def _handle(self) -> dict[str, Any] | None:
        if not self.register or self.turn is None:
            return None
        message = reply_message(
            "".join(self._content) or None,
            "".join(self._reasoning) or None,
            [self._calls[index] for index in sorted(self._calls)],
        )
        return await self.cache.register(self.turn, self.request, message)

    async def whole(self, body: dict[str, Any]) -> dict[str, Any]:
        self._prompt_ids(body)
        message = body["choices"][0]["message"] if body["choices"] else {}
        self._content.append(message.get("content") or "")
        self._reasoning.append(message.get("reasoning") or "")
        self._calls = dict(enumerate(message.get("tool_calls") or []))
        body["prompt_digest"] = self.digest
        handle = await self._handle()
        if handle is not None:
            body["prompt_cache"] = handle
        if not self.wants_ids:
            for choice in body["choices"]:
                choice["token_ids"] = None
        return body

    async def stream(self, events: AsyncIterator[str], include_usage: bool) -> AsyncIterator[str]:
        """vLLM's chunks, passed on; the extension's fields ride on the usage chunk (or, without usage, on
        the chunk that finishes the last choice)."""
        choices_left = self.request.n or 1
        async for event in events:
            if not event.startswith("data: {"):
                yield event
                continue
            chunk = json.loads(event[len("data: ") :])
            changed = self._note(chunk)
            finishing = [c for c in chunk.get("choices") or [] if c.get("finish_reason") is not None]
            choices_left -= len(finishing)
            if not self.wants_ids and _forced(chunk):
                continue
            last = (
                chunk.get("usage") is not None and not chunk.get("choices")
                if include_usage
                else (bool(finishing) and choices_left <= 0)
            )
            if last and self.digest is not None:
                chunk["prompt_digest"] = self.digest
                handle = await self._handle()
                if handle is not None:
                    chunk["prompt_cache"] = handle
                changed = True
            yield (
                f"data: {json.dumps(chunk, separators=(',', ':'), ensure_ascii=False)}\n\n"
                if changed
                else event
            )

    def _note(self, chunk: dict[str, Any]) -> bool:
        """Take what the reply needs from a chunk; True if its token ids were taken out or cut."""
        changed = False
        if chunk.get("prompt_token_ids") is not None:
            self._prompt_ids(chunk)
            changed = not self.wants_ids or "prompt_token_ids_start" in chunk
        for choice in chunk.get("choices") or []:
            if not self.wants_ids and choice.get("token_ids") is not None:
                choice["token_ids"] = None
                changed = True
            if choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            self._content.append(delta.get("content") or "")
            self._reasoning.append(delta.get("reasoning") or delta.get("reasoning_content") or "")
            for piece in delta.get("tool_calls") or []:
                call = self._calls.setdefault(
                    int(piece.get("index") or 0), {"id": None, "function": {"name": "", "arguments": ""}}
                )
                function = piece.get("function") or {}
                call["id"] = call["id"] or piece.get("id")
                call["function"]["name"] += function.get("name") or ""
                call["function"]["arguments"] += function.get("arguments") or ""
        return changed


def _forced(chunk: dict[str, Any]) -> bool:
    """A chunk vLLM sends only because token ids were asked for: no text, no finish, no log-probs."""
    choices = chunk.get("choices") or []
    return bool(choices) and all(
        not choice.get("delta") and choice.get("finish_reason") is None and not choice.get("logprobs")
        for choice in choices
    )
