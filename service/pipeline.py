"""One turn: load -> decide -> forward -> persist; the only place store, domain and backend meet."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy.ext.asyncio import AsyncConnection

from service import metrics
from service.backends.client import BackendClient, BackendMiss, ChatReply, ChatStream
from service.config import Settings
from service.domain import ids
from service.domain.chat import chat_options, responses_usage
from service.domain.fingerprint import combined_fingerprint
from service.domain.items import Item, Segment, compaction_item
from service.domain.output import OutputBuilder
from service.domain.plan import ParentState, RenderInputs, TurnInputs, TurnPlan, plan_turn
from service.domain.policy import Decision, ParentPrefix, Reason, backend_miss, truncated
from service.errors import ContextLengthExceeded, ConvstateError, InvalidRequest, NotFound
from service.store.conversations import ConversationStore
from service.store.responses import ParentTurn, PrefixWrite, ResponseStore, StoredResponse, TurnWrite
from service.store.tenants import TenantStore
from service.workers.canary import Canary

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
    "include",
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
    conversation_id: str | None = None


@dataclass(slots=True)
class TurnResult:
    response: StoredResponse
    decision: Decision
    prompt_digest: str | None
    bytes_sent: int


@dataclass(slots=True)
class Compaction:
    """POST /v1/responses/compact: the user's messages, then one item standing for everything."""

    id: str
    created_at: float
    output: list[Item]
    usage: dict[str, Any]


COMPACT_PROMPT = (
    "Summarize the conversation so far for your own later use: the user's goals, the facts and decisions "
    "established, tool results that still matter, and what remains to be done. Be complete but brief."
)


@dataclass(slots=True)
class PreparedTurn:
    """Everything decided before the backend is called."""

    tenant: str
    request: TurnRequest
    parent: ParentTurn | None
    plan: TurnPlan
    response_id: str
    created_at: float
    conversation_version: int | None = None

    @property
    def decision(self) -> Decision:
        return self.plan.decision


@dataclass(frozen=True, slots=True)
class Sent:
    """How a turn finally went to the backend: the decision that held, and the fingerprint parts of the
    body that was sent (the prefix record's parts)."""

    decision: Decision
    parts: dict[str, str | None]


Event = dict[str, Any]
T = TypeVar("T")

# A background response's worker holds a lease it renews every heartbeat; the reaper fails responses whose
# lease ran out (their process died). The heartbeat also notices a cancel made on any replica.
LEASE_SECONDS = 30.0
HEARTBEAT_SECONDS = 1.0


class TurnStream:
    """A streamed turn whose backend call has been accepted: its decision, then its events.

    The turn runs in its own task, so a client that goes away mid-stream does not stop it: the turn is
    completed and stored either way."""

    def __init__(self, decision: Decision, events: asyncio.Queue[Event | None]) -> None:
        self.decision = decision
        self._events = events

    async def events(self) -> AsyncIterator[Event]:
        while (event := await self._events.get()) is not None:
            yield event


def usage_object(reply: ChatReply) -> dict[str, Any]:
    return responses_usage(
        reply.prompt_tokens, reply.completion_tokens, reply.cached_tokens, reply.reasoning_tokens
    )


def _parent_state(parent: ParentTurn | None) -> ParentState | None:
    if parent is None:
        return None
    return ParentState(
        parent.response.id, parent.response.status, parent.response.output, _parent_prefix(parent)
    )


def _parent_prefix(parent: ParentTurn) -> ParentPrefix | None:
    record = parent.prefix
    if record is None:
        return None
    return ParentPrefix(
        valid=record.status == "valid",
        fingerprint_parts=record.fingerprint_parts,
        handle_ref=record.handle_ref,
        backend_fingerprint=record.backend_fingerprint,
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
        self,
        settings: Settings,
        responses: ResponseStore,
        conversations: ConversationStore,
        tenants: TenantStore,
        backend: BackendClient,
    ) -> None:
        self.settings = settings
        self.responses = responses
        self.conversations = conversations
        self.tenants = tenants
        self.backend = backend
        self.canary = Canary(backend, responses, conversations)
        self._background: set[asyncio.Task[Any]] = set()

    # --- the two entry points -----------------------------------------------------------------------

    async def create(self, tenant: str, request: TurnRequest) -> TurnResult:
        turn = await self._prepare(tenant, request)
        async with self._releasing_on_failure(turn):
            if request.background:
                return await self._enqueue(turn)
            reply, sent = await self._send(turn, self.backend.chat)
            builder = OutputBuilder()
            builder.whole(reply.content, reply.reasoning, reply.tool_calls, reply.logprobs)
            return await self._complete(turn, reply, sent, builder.finish(_status(reply)))

    async def stream(self, tenant: str, request: TurnRequest) -> TurnStream:
        """Validation, parent and backend errors raise here, before any event; later ones become events."""
        turn = await self._prepare(tenant, request)
        async with self._releasing_on_failure(turn):
            chat, sent = await self._send(turn, self.backend.open_chat_stream)
        queue: asyncio.Queue[Event | None] = asyncio.Queue()
        self._spawn(self._produce(turn, chat, sent, queue))
        return TurnStream(sent.decision, queue)

    async def compact(self, tenant: str, request: TurnRequest) -> Compaction:
        """Summarize a history with the backend. Nothing is stored: the caller continues from the
        returned items, which start a new history (the first turn after it decides `no_parent`)."""
        turn = await self._prepare(tenant, request)
        segments = [*await self._history(turn), (False, request.input)]
        body = turn.plan.render_body(segments)
        body["messages"].append({"role": "user", "content": COMPACT_PROMPT})
        headers = {"x-request-id": request.request_id} if request.request_id else {}
        reply = await self.backend.chat(body, headers)
        users = [
            item
            for is_output, items in segments
            if not is_output
            for item in items
            if item["type"] == "message" and item["role"] == "user"
        ]
        output = [*users, compaction_item(reply.content or "")]
        return Compaction(turn.response_id, turn.created_at, output, usage_object(reply))

    # --- load and decide ----------------------------------------------------------------------------

    async def _prepare(self, tenant: str, request: TurnRequest) -> PreparedTurn:
        now = time.time()
        response_id = ids.new_id(ids.RESPONSE)
        if request.conversation_id is None:
            return await self._decide(tenant, request, response_id, now, None, None)
        conversation = await self.conversations.begin_turn(
            tenant, request.conversation_id, response_id, self.settings.backend_timeout + LEASE_SECONDS, now
        )
        if conversation is None:
            raise NotFound(
                f"Conversation with id '{request.conversation_id}' not found.", param="conversation"
            )
        try:
            return await self._decide(
                tenant, request, response_id, now, conversation.head_response_id, conversation.version
            )
        except BaseException:
            await self.conversations.release_turn(tenant, request.conversation_id, response_id)
            raise

    @asynccontextmanager
    async def _releasing_on_failure(self, turn: PreparedTurn) -> AsyncIterator[None]:
        """A conversation turn that fails before it is stored gives its conversation's lock back."""
        try:
            yield
        except BaseException:
            await self._release(turn)
            raise

    async def _decide(
        self,
        tenant: str,
        request: TurnRequest,
        response_id: str,
        now: float,
        head_response_id: str | None,
        conversation_version: int | None,
    ) -> PreparedTurn:
        parent: ParentTurn | None = None
        if head_response_id is not None:
            parent = await self.responses.load_parent(tenant, head_response_id)
        elif request.previous_response_id is not None:
            parent = await self.responses.load_parent(tenant, request.previous_response_id)
            if parent is None:
                raise InvalidRequest(
                    f"Previous response with id '{request.previous_response_id}' not found.",
                    param="previous_response_id",
                    code="previous_response_not_found",
                )
        plan = plan_turn(
            TurnInputs(
                render=RenderInputs(
                    model=request.model,
                    instructions=request.instructions,
                    input=request.input,
                    settings=chat_options(request.settings),
                    cache_salt=await self.tenants.cache_salt(tenant),
                ),
                mode=self.settings.backend_mode,
                store=request.store,
                backend=await self.backend.model_info(request.model),
                parent=_parent_state(parent),
                has_parent=parent is not None,
                conversation_version=conversation_version,
                now=now,
                canary=random.random() < self.settings.canary_fraction,
            )
        )
        return PreparedTurn(
            tenant=tenant,
            request=request,
            parent=parent,
            plan=plan,
            response_id=response_id,
            created_at=now,
            conversation_version=conversation_version,
        )

    # --- forward ------------------------------------------------------------------------------------

    async def _send(
        self, turn: PreparedTurn, send: Callable[[dict[str, Any], dict[str, str]], Awaitable[T]]
    ) -> tuple[T, Sent]:
        """Send by the decided path; a typed miss on the cache path is resent in full at once."""
        headers = {"x-request-id": turn.request.request_id} if turn.request.request_id else {}
        plan = turn.plan
        decision = plan.decision
        if plan.cache_body is not None:
            try:
                return await send(plan.cache_body, headers), Sent(decision, plan.sent_parts(plan.cache_body))
            except BackendMiss as miss:
                log.info("backend refused the handle (%s); resending %s in full", miss.code, turn.response_id)
                metrics.fallbacks.labels(miss.code).inc()
                decision = backend_miss(miss.code)
            except ContextLengthExceeded:
                if turn.request.settings.get("truncation") != "auto":
                    raise
        history = await self._history(turn)
        try:
            body = plan.full_body(history)
            return await send(body, headers), Sent(decision, plan.sent_parts(body))
        except ContextLengthExceeded:
            if turn.request.settings.get("truncation") != "auto" or not history:
                raise
        # truncation=auto: drop the oldest history, doubling the cut, until the prompt fits.
        dropped = 1
        while True:
            try:
                body = plan.full_body(history[dropped:])
                return await send(body, headers), Sent(truncated(dropped), plan.sent_parts(body))
            except ContextLengthExceeded:
                if dropped >= len(history):
                    raise
                dropped = min(2 * dropped, len(history))

    async def _history(self, turn: PreparedTurn) -> Sequence[Segment]:
        """The stored history before this turn: one query, from the conversation or the lineage."""
        parent, conversation_id = turn.parent, turn.request.conversation_id
        if conversation_id is not None:
            return await self.conversations.history(turn.tenant, conversation_id)
        return await self.responses.history(turn.tenant, parent.response.id) if parent else []

    # --- persist ------------------------------------------------------------------------------------

    def _response(
        self, turn: PreparedTurn, status: str, output: list[Item], reply: ChatReply | None
    ) -> StoredResponse:
        request = turn.request
        return StoredResponse(
            id=turn.response_id,
            tenant=turn.tenant,
            model=request.model,
            status=status,
            previous_response_id=request.previous_response_id,
            conversation_id=request.conversation_id,
            depth=turn.parent.response.depth + 1 if turn.parent else 0,
            instructions=request.instructions,
            settings=request.settings,
            usage=usage_object(reply) if reply else None,
            error=None,
            incomplete_details={"reason": "max_output_tokens"} if status == "incomplete" else None,
            store=request.store,
            background=request.background,
            created_at=turn.created_at,
            completed_at=time.time() if status != "in_progress" else None,
            output=output,
        )

    async def _complete(
        self, turn: PreparedTurn, reply: ChatReply, sent: Sent, output: list[Item]
    ) -> TurnResult:
        response = self._response(turn, _status(reply), output, reply)
        _count(reply, sent.decision)
        if turn.request.store:
            prefix = _prefix_write(reply, sent, turn, self.backend.base_url)
            await self._write(turn, response, prefix)
            if sent.decision.reason is Reason.CANARY and reply.handle is not None:
                self._spawn(self.canary.check(turn.tenant, turn.plan, response, reply.handle))
        return TurnResult(response, sent.decision, reply.prompt_digest, reply.bytes_sent)

    def _turn_write(
        self,
        turn: PreparedTurn,
        response: StoredResponse,
        prefix: PrefixWrite | None,
        *,
        append: bool = False,
    ) -> TurnWrite:
        """The turn's rows; with `append`, a conversation turn's items join the conversation in the same
        transaction (which also moves its head and releases its lock)."""
        conversation_id = turn.request.conversation_id
        also: Callable[[AsyncConnection], Awaitable[int]] | None = None
        if append and conversation_id is not None:
            item_ids = [item["id"] for item in (*turn.request.input, *response.output)]

            def also(conn: AsyncConnection) -> Awaitable[int]:
                return self.conversations.finish_turn(
                    conn, turn.tenant, conversation_id, turn.response_id, item_ids
                )

        return TurnWrite(
            response=response,
            expires_at=turn.created_at + self.settings.response_ttl_days * 86400,
            input_items=turn.request.input,
            output_items=response.output,
            prefix=prefix,
            also=also,
        )

    async def _write(self, turn: PreparedTurn, response: StoredResponse, prefix: PrefixWrite | None) -> None:
        """A completed turn (with a prefix record) joins its conversation; a failed one only frees it."""
        await self.responses.write_turn(self._turn_write(turn, response, prefix, append=prefix is not None))

    async def _produce(
        self, turn: PreparedTurn, chat: ChatStream, sent: Sent, queue: asyncio.Queue[Event | None]
    ) -> None:
        sequence = 0

        def emit(event: Event) -> None:
            nonlocal sequence
            queue.put_nowait({**event, "sequence_number": sequence})
            sequence += 1

        builder = OutputBuilder()
        completed = False
        try:
            emit({"type": "response.created", "response": self._response(turn, "in_progress", [], None)})
            emit({"type": "response.in_progress", "response": self._response(turn, "in_progress", [], None)})
            async for delta in chat.deltas():
                builder.reasoning_delta(delta.reasoning)
                builder.text_delta(delta.content, delta.logprobs)
                for index, call_id, name, arguments in delta.tool_calls:
                    builder.tool_call_delta(index, call_id, name, arguments)
                for event in builder.drain():
                    emit(event)
            reply = chat.reply()
            output = builder.finish(_status(reply))
            for event in builder.drain():
                emit(event)
            result = await self._complete(turn, reply, sent, output)
            completed = True
            emit({"type": f"response.{result.response.status}", "response": result.response})
        except ConvstateError as exc:
            log.warning("streamed turn %s failed: %s", turn.response_id, exc.message)
            failed = self._response(turn, "failed", builder.finish("incomplete"), None)
            # The response object's error code is a closed set; the error event carries the precise one.
            failed.error = {"code": "server_error", "message": exc.message}
            if turn.request.store:
                await self._write(turn, failed, None)
            emit({"type": "error", "code": exc.code, "message": exc.message, "param": exc.param})
            emit({"type": "response.failed", "response": failed})
        finally:
            await chat.aclose()
            queue.put_nowait(None)
            if not completed:
                await self._release(turn)

    # --- background mode ----------------------------------------------------------------------------

    async def _enqueue(self, turn: PreparedTurn) -> TurnResult:
        """Store the response as queued (readable at once, from any replica) and run it in a task."""
        queued = self._response(turn, "queued", [], None)
        await self.responses.insert_queued(self._turn_write(turn, queued, None), time.time() + LEASE_SECONDS)
        self._spawn(self._run_background(turn))
        return TurnResult(queued, turn.decision, None, 0)

    async def _run_background(self, turn: PreparedTurn) -> None:
        appended = False
        try:
            appended = await self._run_started(turn)
        finally:
            if not appended:
                await self._release(turn)

    async def _run_started(self, turn: PreparedTurn) -> bool:
        """True once the completed turn is stored (and, in a conversation, appended to it)."""
        if not await self.responses.start(turn.tenant, turn.response_id, time.time() + LEASE_SECONDS):
            return False  # cancelled while queued
        work = asyncio.get_running_loop().create_task(self._send(turn, self.backend.chat))
        try:
            # The heartbeat doubles as the cancel check: it fails once any replica cancelled the response.
            while not (await asyncio.wait({work}, timeout=HEARTBEAT_SECONDS))[0]:
                if not await self.responses.heartbeat(turn.response_id, time.time() + LEASE_SECONDS):
                    work.cancel()
                    return False
            reply, sent = work.result()
        except ConvstateError as exc:
            failed = self._response(turn, "failed", [], None)
            failed.error = {"code": "server_error", "message": exc.message}
            await self.responses.finish(self._turn_write(turn, failed, None))
            return False
        builder = OutputBuilder()
        builder.whole(reply.content, reply.reasoning, reply.tool_calls, reply.logprobs)
        response = self._response(turn, _status(reply), builder.finish(_status(reply)), reply)
        _count(reply, sent.decision)
        prefix = _prefix_write(reply, sent, turn, self.backend.base_url)
        return await self.responses.finish(self._turn_write(turn, response, prefix, append=True))

    async def _release(self, turn: PreparedTurn) -> None:
        if turn.request.conversation_id is not None:
            await self.conversations.release_turn(turn.tenant, turn.request.conversation_id, turn.response_id)

    # --- off the hot path ---------------------------------------------------------------------------

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[Any]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task failed", exc_info=task.exception())

    async def aclose(self) -> None:
        """Let turns in flight finish (they persist), then stop."""
        if self._background:
            await asyncio.wait(list(self._background), timeout=10)
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)


def _count(reply: ChatReply, decision: Decision) -> None:
    metrics.decisions.labels(decision.path, decision.label).inc()
    metrics.bytes_forwarded.labels(decision.path).inc(reply.bytes_sent)
    metrics.prompt_tokens.inc(reply.prompt_tokens)
    metrics.cached_tokens.inc(reply.cached_tokens)


def _status(reply: ChatReply) -> str:
    return "incomplete" if reply.finish_reason == "length" else "completed"


def _prefix_write(reply: ChatReply, sent: Sent, turn: PreparedTurn, endpoint: str) -> PrefixWrite:
    decision, parts = sent.decision, sent.parts
    # A truncated turn's handle covers a history its children will not render: never offer it.
    handle = None if decision.reason is Reason.TRUNCATED else reply.handle
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
        backend_fingerprint=(handle.fingerprint if handle else None)
        or (turn.plan.backend.backend_fingerprint if turn.plan.backend else None),
        fingerprint_parts=dict(parts),
        handle_ref=handle.ref if handle else None,
        handle_endpoint=endpoint if handle else None,
        handle_epoch=handle.epoch if handle else None,
        handle_expires_at=handle.expires_at if handle else None,
        conversation_version=turn.conversation_version,
    )
