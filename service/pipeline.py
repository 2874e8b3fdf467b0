"""One turn: load -> decide -> forward -> persist; the only place store, domain and backend meet."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any

import xxhash

from service.backends.client import BackendClient, BackendMiss, ChatReply
from service.config import Settings
from service.domain import ids
from service.domain.fingerprint import RequestRenderSettings, combined_fingerprint, fingerprint_parts
from service.domain.items import Item, history_messages, output_items, segment_messages
from service.domain.policy import (
    BackendMode,
    Decision,
    DecisionInputs,
    ParentPrefix,
    Path,
    backend_miss,
    decide,
)
from service.domain.prefix import token_digest
from service.errors import InvalidRequest
from service.store.responses import ParentTurn, PrefixWrite, ResponseStore, StoredResponse, TurnWrite
from service.store.tenants import TenantStore

log = logging.getLogger("convstate.pipeline")

# Request settings echoed on the response object and kept with it.
ECHOED_SETTINGS = (
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "temperature",
    "top_p",
    "max_output_tokens",
    "metadata",
    "text",
    "reasoning",
    "truncation",
    "user",
    "safety_identifier",
    "prompt_cache_key",
    "service_tier",
    "top_logprobs",
    "max_tool_calls",
)


@dataclass(slots=True)
class TurnRequest:
    """A validated POST /v1/responses, with input already normalized to stored items."""

    model: str
    input: list[Item]
    instructions: str | None
    previous_response_id: str | None
    store: bool
    settings: dict[str, Any]
    background: bool = False
    request_id: str | None = None


@dataclass(slots=True)
class TurnResult:
    response: StoredResponse
    decision: Decision
    prompt_digest: str | None
    bytes_sent: int


@dataclass(slots=True)
class _Forwarded:
    reply: ChatReply
    decision: Decision
    messages_sent: list[dict[str, Any]] = field(default_factory=list)


def chat_tools(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    """Responses function tools -> chat-completions tools."""
    if not tools:
        return None
    converted = []
    for tool in tools:
        function = {key: tool[key] for key in ("name", "description", "parameters", "strict") if key in tool}
        converted.append({"type": "function", "function": function})
    return converted


def chat_tool_choice(choice: Any) -> Any:
    if isinstance(choice, dict) and choice.get("type") == "function":
        return {"type": "function", "function": {"name": choice.get("name")}}
    return choice


def response_format(text: dict[str, Any] | None) -> dict[str, Any] | None:
    fmt = (text or {}).get("format") or {}
    kind = fmt.get("type")
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        schema = {key: fmt[key] for key in ("name", "schema", "strict", "description") if key in fmt}
        return {"type": "json_schema", "json_schema": schema}
    return None


def reasoning_effort(reasoning: dict[str, Any] | None) -> str | None:
    effort = (reasoning or {}).get("effort")
    return str(effort) if effort else None


def usage_object(reply: ChatReply) -> dict[str, Any]:
    return {
        "input_tokens": reply.prompt_tokens,
        "input_tokens_details": {"cached_tokens": reply.cached_tokens, "cache_write_tokens": 0},
        "output_tokens": reply.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": reply.reasoning_tokens},
        "total_tokens": reply.prompt_tokens + reply.completion_tokens,
    }


def _parent_prefix(parent: ParentTurn | None) -> ParentPrefix | None:
    if parent is None or parent.prefix is None:
        return None
    record = parent.prefix
    return ParentPrefix(
        valid=record.status == "valid",
        fingerprint_parts=record.fingerprint_parts,
        handle_ref=record.handle_ref,
        handle_epoch=record.handle_epoch,
        handle_expires_at=record.handle_expires_at,
        safe_tokens=record.safe_tokens,
        prefix_hash=record.prefix_hash,
        covers_output=record.covers_output,
        created_at=record.created_at,
        conversation_version=record.conversation_version,
    )


class Pipeline:
    def __init__(
        self, settings: Settings, responses: ResponseStore, tenants: TenantStore, backend: BackendClient
    ) -> None:
        self.settings = settings
        self.responses = responses
        self.tenants = tenants
        self.backend = backend
        self._background: set[asyncio.Task[None]] = set()

    async def create(self, tenant: str, request: TurnRequest) -> TurnResult:
        now = time.time()
        parent: ParentTurn | None = None
        if request.previous_response_id is not None:
            parent = await self.responses.load_parent(tenant, request.previous_response_id)
            if parent is None:
                raise InvalidRequest(
                    f"Previous response with id '{request.previous_response_id}' not found.",
                    param="previous_response_id",
                    code="previous_response_not_found",
                )
        info = await self.backend.model_info(request.model)
        salt = await self.tenants.cache_salt(tenant)
        render = RequestRenderSettings(
            instructions=request.instructions,
            tools=request.settings.get("tools"),
            tool_choice=request.settings.get("tool_choice"),
            reasoning=request.settings.get("reasoning"),
            chat_template_kwargs=None,
            cache_salt_id=xxhash.xxh3_64_hexdigest(salt.encode()),
        )
        parts = fingerprint_parts(info, render) if info is not None else {}
        decision = decide(
            DecisionInputs(
                mode=self.settings.backend_mode,
                has_parent=parent is not None,
                store=request.store,
                parent=_parent_prefix(parent),
                current_parts=parts,
                backend_epoch=info.epoch if info else None,
                now=now,
                canary=random.random() < self.settings.canary_fraction,
            )
        )
        forwarded = await self._forward(tenant, request, parent, decision, salt)
        reply = forwarded.reply
        truncated = reply.finish_reason == "length"
        status = "incomplete" if truncated else "completed"
        output = output_items(reply.content, reply.reasoning, reply.tool_calls, status=status)
        response = StoredResponse(
            id=ids.new_id(ids.RESPONSE),
            tenant=tenant,
            model=request.model,
            status=status,
            previous_response_id=request.previous_response_id,
            conversation_id=None,
            depth=parent.response.depth + 1 if parent else 0,
            instructions=request.instructions,
            settings=request.settings,
            usage=usage_object(reply),
            error=None,
            incomplete_details={"reason": "max_output_tokens"} if truncated else None,
            store=request.store,
            background=request.background,
            created_at=now,
            completed_at=time.time(),
            output=output,
        )
        if request.store:
            prefix = self._prefix_write(forwarded, parts, info.backend_fingerprint if info else None)
            await self.responses.write_turn(
                TurnWrite(
                    response=response,
                    expires_at=now + self.settings.response_ttl_days * 86400,
                    input_items=request.input,
                    output_items=output,
                    prefix=prefix,
                )
            )
            if forwarded.decision.reason == "canary" and reply.handle is not None:
                self._spawn(self._canary(tenant, response, request, salt, reply))
        return TurnResult(response, forwarded.decision, reply.prompt_digest, reply.bytes_sent)

    def _chat_body(self, request: TurnRequest, salt: str) -> dict[str, Any]:
        settings = request.settings
        body: dict[str, Any] = {"model": request.model, "cache_salt": salt}
        optional = {
            "temperature": settings.get("temperature"),
            "top_p": settings.get("top_p"),
            "max_tokens": settings.get("max_output_tokens"),
            "tools": chat_tools(settings.get("tools")),
            "tool_choice": chat_tool_choice(settings.get("tool_choice")) if settings.get("tools") else None,
            "parallel_tool_calls": settings.get("parallel_tool_calls") if settings.get("tools") else None,
            "reasoning_effort": reasoning_effort(settings.get("reasoning")),
            "response_format": response_format(settings.get("text")),
            "top_logprobs": settings.get("top_logprobs"),
            "logprobs": True if settings.get("top_logprobs") else None,
            "user": settings.get("safety_identifier") or settings.get("user"),
        }
        body.update({key: value for key, value in optional.items() if value is not None})
        return body

    async def _forward(
        self,
        tenant: str,
        request: TurnRequest,
        parent: ParentTurn | None,
        decision: Decision,
        salt: str,
    ) -> _Forwarded:
        headers = {"x-request-id": request.request_id} if request.request_id else {}
        body = self._chat_body(request, salt)
        register = self.settings.backend_mode is not BackendMode.FULL and request.store
        if decision.path is Path.CACHE_REF and parent is not None and parent.prefix is not None:
            record = parent.prefix
            segments = [request.input] if record.covers_output else [parent.response.output, request.input]
            messages = [message for segment in segments for message in segment_messages(segment)]
            body["messages"] = messages
            body["prompt_cache"] = {
                "ref": record.handle_ref,
                "tokens": record.safe_tokens,
                "prefix_hash": record.prefix_hash,
                "fingerprint": record.backend_fingerprint,
                "register": register,
            }
            try:
                return _Forwarded(await self.backend.chat(body, headers), decision, messages)
            except BackendMiss as miss:
                log.info("backend refused handle %s: %s; resending in full", record.handle_ref, miss.code)
                decision = backend_miss(miss.code)
        segments = await self.responses.history(tenant, parent.response.id) if parent else []
        messages = history_messages(request.instructions, [*segments, request.input])
        body["messages"] = messages
        body.pop("prompt_cache", None)
        if register:
            body["prompt_cache"] = {"register": True}
        return _Forwarded(await self.backend.chat(body, headers), decision, messages)

    @staticmethod
    def _prefix_write(
        forwarded: _Forwarded, parts: dict[str, str | None], backend_fingerprint: str | None
    ) -> PrefixWrite:
        reply, decision, handle = forwarded.reply, forwarded.decision, forwarded.reply.handle
        return PrefixWrite(
            status="valid",
            decision_path=str(decision.path),
            decision_reason=decision.label,
            prompt_tokens=reply.prompt_tokens,
            prompt_digest=reply.prompt_digest,
            cached_tokens=reply.cached_tokens,
            reused_tokens=handle.reused_tokens if handle else 0,
            bytes_sent=reply.bytes_sent,
            turn_tokens=handle.tokens if handle else None,
            safe_boundary=handle.safe_boundary if handle else None,
            safe_tokens=handle.safe_tokens if handle else None,
            prefix_hash=handle.prefix_hash if handle else None,
            covers_output=handle.covers_output if handle else None,
            fingerprint=combined_fingerprint(parts),
            backend_fingerprint=(handle.fingerprint if handle else None) or backend_fingerprint,
            fingerprint_parts=dict(parts),
            handle_ref=handle.ref if handle else None,
            handle_endpoint=None,
            handle_epoch=handle.epoch if handle else None,
            handle_expires_at=handle.expires_at if handle else None,
            conversation_version=None,
        )

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _canary(
        self, tenant: str, response: StoredResponse, request: TurnRequest, salt: str, reply: ChatReply
    ) -> None:
        """Off the hot path: render the whole history in full and check the new handle's prefix hash."""
        handle = reply.handle
        assert handle is not None
        try:
            segments = await self.responses.history(tenant, response.id)
            messages = history_messages(request.instructions, segments)
            chat = self._chat_body(request, salt)
            body: dict[str, Any] = {key: chat[key] for key in ("model", "tools", "reasoning_effort") if key in chat}
            body.update(messages=messages, add_generation_prompt=False)
            tokens = await self.backend.tokenize_chat(body)
        except Exception:
            log.exception("canary render failed for %s", response.id)
            return
        expected = token_digest(tokens[: handle.safe_tokens])
        if expected != handle.prefix_hash or len(tokens) < handle.safe_tokens:
            log.error(
                "canary mismatch for %s: handle prefix_hash=%s full render=%s",
                response.id,
                handle.prefix_hash,
                expected,
            )
            await self.responses.invalidate_record(tenant, response.id, "canary_mismatch")

    async def aclose(self) -> None:
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
