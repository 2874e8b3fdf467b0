"""One turn: load -> plan -> send -> persist; the only place store, domain and backend meet.

The story of a turn (`create` and `stream` below):

1. **Prepare** (`_prepare`): load the parent (`previous_response_id`, or in a conversation its head, read
   while taking its turn lock) with its prefix record in one round trip; ask the backend client for the
   model's card and the tenant store for the salt; `domain.plan.plan_turn` (pure) then decides the path
   and builds the exact backend body and its fingerprint from one object.
2. **Send** (`_send`): the plan's cache body (the handle plus the new messages) if it has one; on a typed
   miss, or without one, the full body from the stored history (one query); `truncation=auto` drops the
   oldest history until it fits. The fingerprint recorded is that of the body actually sent.
3. **Persist** (`_write`): response, items, prefix record and the conversation append in one round trip
   (store/turns.py), committed before the id is returned. Then the token ids the backend reported go to
   the artifact writer's queue (in process, never waited for: service/workers/artifacts.py).

When the parent's handle fails (a typed miss) or is known to be gone (a backend restart, expiry), the
parent's prefix is rebuilt on the backend from its stored token ids (`_reseed`, CONVSTATE_RESEED=artifact)
instead of sending and rendering the whole history, when the backend takes seeds and the ids were
produced under the same fingerprint; otherwise the full path.

A turn always ends. One answered whole is stored in one unit of work when it completes (nothing before:
its id has not left the service). A streamed or background turn's row is inserted, in progress or
queued, before its id is announced, and a heartbeat renews its lease (and its conversation's lock) while
it runs; whatever fails afterwards moves the row to `failed` and, in a stream, sends `error` then
`response.failed`. If the database cannot take even that write, the lease runs out and the reaper
(service/workers/reaper.py) fails the row.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from service import metrics
from service.backends.client import BackendClient, BackendMiss, ChatReply, ChatStream
from service.config import ReseedMode, Settings
from service.domain import ids
from service.domain.artifacts import TurnTokens, rebuild, unpack
from service.domain.chat import chat_options, responses_usage
from service.domain.fingerprint import combined_fingerprint
from service.domain.histories import HistoryCache
from service.domain.items import Item, Segment, compaction_item
from service.domain.output import OutputBuilder, terminal_event_type
from service.domain.plan import ParentState, RenderInputs, TurnInputs, TurnPlan, plan_turn
from service.domain.policy import Decision, ParentPrefix, Reason, backend_miss, reseeded, truncated
from service.domain.replay import CachePolicy
from service.domain.threads import choose_thread
from service.errors import (
    ContextLengthExceeded,
    ConvstateError,
    InvalidRequest,
    LeaseLost,
    NotFound,
    ServiceUnavailable,
)
from service.replay import ReplayCache
from service.store.artifacts import ArtifactStore
from service.store.conversations import ConversationStore, ConversationTurn
from service.store.events import EventStore
from service.store.responses import ParentTurn, PrefixWrite, ResponseStore, StoredResponse, TurnWrite
from service.store.tenants import TenantStore
from service.store.turns import ConversationAppend, TurnStore
from service.store.unit import unit_of_work
from service.workers.artifacts import ArtifactQueue
from service.workers.background import BackgroundRunner, EventRecorder
from service.workers.canary import Canary
from service.workers.invalidations import InvalidationWatcher
from service.workers.tasks import TaskSet

log = logging.getLogger("convstate.pipeline")

# Request settings echoed on the response object and kept with it.
ECHOED_SETTINGS = (
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "temperature",
    "top_p",
    "presence_penalty",
    "frequency_penalty",
    "max_output_tokens",
    "metadata",
    "text",
    "reasoning",
    "truncation",
    "user",
    "safety_identifier",
    "prompt_cache_key",
    "prompt_cache_retention",
    "service_tier",
    "top_logprobs",
    "max_tool_calls",
    "include",
)


@dataclass(frozen=True, slots=True)
class UnstoredTurn:
    """A `store: false` response its caller keeps (a WebSocket connection does) so that later turns can
    continue it: the response, and the whole history a continuation renders, its output last."""

    response: StoredResponse
    history: tuple[Segment, ...]


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
    # The `previous_response_id`, when the caller kept it unstored: continued without the database.
    unstored_parent: UnstoredTurn | None = None
    # The replay cache, when the turn goes through it (answered whole only; service/replay.py).
    replay: CachePolicy | None = None


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
    # The thread its row goes in (service/domain/threads.py); the one it was stored in once opened.
    thread: str
    # In a conversation: its state when the turn took the lock.
    conversation: ConversationTurn | None = None
    # Its row was inserted before it ran (streamed and background turns): finishing moves it on.
    opened: bool = False
    # The history before this turn, once loaded (the full path).
    history: Sequence[Segment] | None = None

    @property
    def decision(self) -> Decision:
        return self.plan.decision

    @property
    def conversation_version(self) -> int | None:
        return self.conversation.version if self.conversation is not None else None

    @property
    def conversation_start(self) -> int | None:
        """The conversation's length when the turn took its lock: the history it renders lies before."""
        return self.conversation.next_position if self.conversation is not None else None


@dataclass(frozen=True, slots=True)
class Sent:
    """How a turn finally went to the backend: the decision that held, and the fingerprint parts of the
    body that was sent (the prefix record's parts)."""

    decision: Decision
    parts: dict[str, str | None]


Event = dict[str, Any]
T = TypeVar("T")

# A running turn renews its leases every heartbeat (Settings.turn_lease_seconds ahead); the heartbeat
# also notices a cancel made on any replica.
HEARTBEAT_SECONDS = 1.0

SHUT_DOWN = "The service shut down before this response finished; create it again."
UNEXPECTED = "The server had an error while processing your request."
# Decisions that continued the parent's record (its handle, its seed or its session): they relied on its
# claim of a safe boundary.
RELIED = frozenset({Reason.HIT, Reason.CANARY, Reason.RESEED})


class TurnStream:
    """A streamed turn whose backend call has been accepted: its decision, then its events, numbered in
    order (and recorded, for a background turn, so any replica can replay them).

    The turn runs in its own task, so a client that goes away mid-stream does not stop it: the turn is
    completed and stored either way."""

    def __init__(self, decision: Decision, recorder: EventRecorder | None = None) -> None:
        self.decision = decision
        self.recorder = recorder
        self._events: asyncio.Queue[Event | None] = asyncio.Queue()
        self._sequence = 0
        # Set once a `store: false` turn has completed: what a later turn needs to continue it.
        self.unstored: UnstoredTurn | None = None

    def emit(self, event: Event) -> None:
        """Number the event (from 0, in order) and pass it on."""
        numbered = {**event, "sequence_number": self._sequence}
        self._sequence += 1
        self._events.put_nowait(numbered)
        if self.recorder is not None:
            self.recorder.add(numbered)

    def end(self) -> None:
        self._events.put_nowait(None)
        if self.recorder is not None:
            self.recorder.close()

    async def events(self) -> AsyncIterator[Event]:
        while (event := await self._events.get()) is not None:
            yield event


def usage_object(reply: ChatReply) -> dict[str, Any]:
    return responses_usage(
        reply.prompt_tokens,
        reply.completion_tokens,
        reply.cached_tokens,
        reply.reasoning_tokens,
        reply.cache_write_tokens,
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
        session_token=record.session_token,
    )


class Pipeline:
    def __init__(
        self,
        settings: Settings,
        responses: ResponseStore,
        conversations: ConversationStore,
        tenants: TenantStore,
        backend: BackendClient,
        invalidations: InvalidationWatcher,
        events: EventStore,
        artifacts: ArtifactStore,
        artifact_queue: ArtifactQueue,
        replay: ReplayCache | None = None,
    ) -> None:
        self.settings = settings
        self.replay = replay
        self.responses = responses
        self.artifacts = artifacts
        self.artifact_queue = artifact_queue
        self.conversations = conversations
        self.turns = TurnStore(responses.engine, responses, conversations)
        self.tenants = tenants
        self.backend = backend
        self.canary = Canary(backend, responses, conversations)
        self.invalidations = invalidations
        self.tasks = TaskSet()
        self.background = BackgroundRunner(self, events)
        self.histories = HistoryCache(settings.history_cache_bytes)

    @property
    def accepting(self) -> bool:
        """False once the process is shutting down: new turns get 503, readiness fails."""
        return not self.tasks.closing

    # --- the two entry points -----------------------------------------------------------------------

    async def create(self, tenant: str, request: TurnRequest) -> TurnResult:
        """A turn answered whole (stored once it completes), or a background one (stored as queued)."""
        with self._admitted():
            turn = await self._prepare(tenant, request)
            async with self._releasing_on_failure(turn):
                if request.background:
                    return await self._enqueue(turn)
                return await self.answer(turn)

    async def stream(self, tenant: str, request: TurnRequest) -> TurnStream:
        """Validation, parent and backend errors raise here, before any event; whatever fails after
        `response.created` ends the stream with `error` and `response.failed`. A background turn is
        stored as queued and streamed by the background runner, which records its events."""
        with self._admitted():
            turn = await self._prepare(tenant, request)
            async with self._releasing_on_failure(turn):
                if request.background:
                    queued = await self._open(turn, "queued")
                    recorder = self.background.recorder(turn)
                    stream = TurnStream(turn.decision, recorder)
                    stream.emit({"type": "response.created", "response": queued})
                    stream.emit({"type": "response.queued", "response": queued})
                    await self.background.submit_streamed(turn, stream, recorder)
                    return stream
                chat, sent = await self._send(turn, self.backend.open_chat_stream)
                try:
                    if request.store:
                        await self._open(turn, "in_progress")
                except BaseException:
                    await chat.aclose()
                    raise
        stream = TurnStream(sent.decision)
        started = self._response(turn, "in_progress", [], None)
        stream.emit({"type": "response.created", "response": started})
        stream.emit({"type": "response.in_progress", "response": started})
        self.tasks.spawn(self._produce(turn, chat, sent, stream))
        return stream

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

    @contextmanager
    def _admitted(self) -> Iterator[None]:
        """A request's turn: refused once the process is shutting down, waited for by the shutdown, and
        answered 503 (not dropped) if the shutdown's grace period ends first."""
        if not self.accepting:
            raise ServiceUnavailable("This server is shutting down; retry the request.")
        with self.tasks.tracking():
            try:
                yield
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is None or not self.tasks.closing:
                    raise
                task.uncancel()
                raise ServiceUnavailable(SHUT_DOWN) from None

    async def _prepare(self, tenant: str, request: TurnRequest) -> PreparedTurn:
        now = time.time()
        response_id = ids.new_id(ids.RESPONSE)
        if request.conversation_id is None:
            parent = await self._previous(tenant, request, now)
            return await self._plan(tenant, request, response_id, now, parent, None)
        begun = await self.turns.begin(
            tenant, request.conversation_id, response_id, self.settings.turn_lease_seconds, now
        )
        if begun is None:
            raise NotFound(
                f"Conversation with id '{request.conversation_id}' not found.", param="conversation"
            )
        conversation, parent = begun
        try:
            return await self._holding(
                self._plan(tenant, request, response_id, now, parent, conversation),
                tenant,
                response_id,
                request.conversation_id,
                row=False,
            )
        except BaseException:
            await self._release(tenant, request.conversation_id, response_id)
            raise

    async def _previous(self, tenant: str, request: TurnRequest, now: float) -> ParentTurn | None:
        """The response named by `previous_response_id` (one of the connection's own unstored responses,
        or a stored one): 400 if there is none to continue."""
        if request.unstored_parent is not None:
            if request.store:
                raise InvalidRequest(
                    f"Previous response with id '{request.previous_response_id}' was not stored "
                    "(store=false), so a response continuing it cannot be stored: send store=false.",
                    param="store",
                )
            return ParentTurn(request.unstored_parent.response, None)
        if request.previous_response_id is None:
            return None
        parent = await self.turns.load_parent(tenant, request.previous_response_id, now)
        if parent is None:
            raise InvalidRequest(
                f"Previous response with id '{request.previous_response_id}' not found.",
                param="previous_response_id",
                code="previous_response_not_found",
            )
        return parent

    @asynccontextmanager
    async def _releasing_on_failure(self, turn: PreparedTurn) -> AsyncIterator[None]:
        """A conversation turn that fails before it is stored gives its conversation's lock back."""
        try:
            yield
        except BaseException:
            await self.release(turn)
            raise

    async def _plan(
        self,
        tenant: str,
        request: TurnRequest,
        response_id: str,
        now: float,
        parent: ParentTurn | None,
        conversation: ConversationTurn | None,
    ) -> PreparedTurn:
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
                invalidated_since=self.invalidations.invalidated_since(tenant, parent),
                conversation_version=conversation.version if conversation is not None else None,
                now=now,
                canary=random.random() < self.settings.canary_fraction,
                lineage_root=parent.response.lineage_root if parent else response_id,
                token_ids=self.settings.token_artifacts,
            )
        )
        continued = parent if conversation is None else None
        return PreparedTurn(
            tenant=tenant,
            request=request,
            parent=parent,
            plan=plan,
            response_id=response_id,
            created_at=now,
            thread=choose_thread(
                response_id,
                continued.response.thread if continued else None,
                parent_thread_taken=continued.thread_taken if continued else False,
            ),
            conversation=conversation,
        )

    # --- forward ------------------------------------------------------------------------------------

    async def _send(
        self, turn: PreparedTurn, send: Callable[[dict[str, Any], dict[str, str]], Awaitable[T]]
    ) -> tuple[T, Sent]:
        """Send by the decided path; a typed miss on the cache path is reseeded or resent in full at once."""
        headers = {"x-request-id": turn.request.request_id} if turn.request.request_id else {}
        plan = turn.plan
        headers.update(plan.headers)
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
        if plan.seed_base is not None and self.settings.reseed is ReseedMode.ARTIFACT:
            sent = await self._reseed(turn, send, headers, decision)
            if sent is not None:
                return sent
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

    async def _reseed(
        self,
        turn: PreparedTurn,
        send: Callable[[dict[str, Any], dict[str, str]], Awaitable[T]],
        headers: dict[str, str],
        after: Decision,
    ) -> tuple[T, Sent] | None:
        """Send the parent's stored token ids in place of its handle (one read of the cold table, only
        here: never on a hit); None, to go the full way, when its artifact is missing or was produced under
        another fingerprint, or the backend refuses the seed."""
        plan, parent = turn.plan, turn.parent
        assert parent is not None  # a plan has a seed only with a parent record
        stored = await self.artifacts.chain(parent.response.id, turn.tenant)
        if stored is None or stored.fingerprint is None or stored.fingerprint != plan.seed_fingerprint:
            return None
        prompt_ids, output_ids = await asyncio.to_thread(
            lambda: (rebuild(stored.links), unpack(stored.output_ids))
        )
        if prompt_ids is None:  # an ancestor's artifact is gone
            return None
        body = plan.seed_body(prompt_ids, output_ids)
        try:
            return await send(body, headers), Sent(reseeded(after), plan.sent_parts(body))
        except BackendMiss as miss:
            log.info("backend refused the seed (%s); resending %s in full", miss.code, turn.response_id)
            metrics.fallbacks.labels(miss.code).inc()
        except ContextLengthExceeded:
            if turn.request.settings.get("truncation") != "auto":
                raise
        return None

    async def _history(self, turn: PreparedTurn) -> Sequence[Segment]:
        """The history before this turn: one query, from the conversation or the lineage (none for an
        unstored parent, which comes with its history, nor for a lineage this process keeps)."""
        parent, request = turn.parent, turn.request
        if request.unstored_parent is not None:
            turn.history = request.unstored_parent.history
        elif request.conversation_id is not None:
            turn.history = await self.conversations.history(turn.tenant, request.conversation_id)
        else:
            turn.history = await self._chain_history(turn.tenant, parent.response.id) if parent else []
        return turn.history

    async def _chain_history(self, tenant: str, response_id: str) -> Sequence[Segment]:
        """The history through a stored response: as kept by this process, or read (and kept)."""
        kept = self.histories.get(tenant, response_id)
        metrics.labelled(metrics.kept_histories, "miss" if kept is None else "hit").inc()
        if kept is not None:
            return kept
        read = await self.responses.history(tenant, response_id)
        self.histories.keep(tenant, response_id, read)
        return read

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
            completed_at=None if status in ("queued", "in_progress") else time.time(),
            lineage_root=turn.parent.response.lineage_root if turn.parent else turn.response_id,
            thread=turn.thread,
            conversation_start=turn.conversation_start,
            output=output,
        )

    async def answer(self, turn: PreparedTurn) -> TurnResult:
        """Generate the whole reply (renewing what the turn holds meanwhile) and store it."""
        chat: Callable[[dict[str, Any], dict[str, str]], Awaitable[ChatReply]] = self.backend.chat
        if turn.request.replay is not None and self.replay is not None:
            chat = self.replay.chat(turn.tenant, turn.request.replay)
        reply, sent = await self._held(turn, self._send(turn, chat))
        builder = OutputBuilder()
        builder.whole(reply.content, reply.reasoning, reply.tool_calls, reply.logprobs)
        return await self._complete(turn, reply, sent, builder.finish(_status(reply)))

    async def _complete(
        self, turn: PreparedTurn, reply: ChatReply, sent: Sent, output: list[Item]
    ) -> TurnResult:
        response = self._response(turn, _status(reply), output, reply)
        _count(reply, sent.decision)
        if turn.request.store:
            prefix = _prefix_write(reply, sent, turn, self.backend.base_url)
            await self._write(turn, response, prefix)
            self._keep_history(turn, response)
            self._offer_artifact(turn, reply, sent, prefix)
            if sent.decision.reason is Reason.CANARY and reply.handle is not None:
                self.tasks.spawn(self.canary.check(turn.tenant, turn.plan, response, reply.handle))
        return TurnResult(response, sent.decision, reply.prompt_digest, reply.bytes_sent)

    def _keep_history(self, turn: PreparedTurn, response: StoredResponse) -> None:
        """A chain turn that rendered its history (the full path) keeps it, with its own items, for a
        child taking the full path on this replica."""
        request = turn.request
        if turn.history is None or request.conversation_id is not None or request.unstored_parent is not None:
            return
        parent_id = turn.parent.response.id if turn.parent else None
        self.histories.extend(turn.tenant, parent_id, response.id, request.input, response.output)

    def expires_at(self, turn: PreparedTurn) -> float:
        return turn.created_at + self.tenants.response_ttl_seconds(turn.tenant)

    def _offer_artifact(self, turn: PreparedTurn, reply: ChatReply, sent: Sent, prefix: PrefixWrite) -> None:
        """Hand the committed turn's token ids to the artifact writer (dropped and counted if its queue is
        full: the turn never waits)."""
        if reply.prompt_token_ids is None or reply.output_token_ids is None:
            return
        decision = sent.decision
        expires_at = self.expires_at(turn)
        self.artifact_queue.offer(
            TurnTokens(
                response_id=turn.response_id,
                tenant=turn.tenant,
                model=turn.request.model,
                parent_id=turn.parent.response.id if turn.parent else None,
                fingerprint=prefix.fingerprint,
                template=sent.parts.get("chat_template"),
                decision=decision.header,
                relied_on_parent=decision.reason in RELIED,
                prompt_ids=reply.prompt_token_ids,
                prompt_start=reply.prompt_token_ids_start,
                output_ids=reply.output_token_ids,
                created_at=turn.created_at,
                expires_at=min(expires_at, turn.created_at + self.settings.artifact_ttl_days * 86400),
            )
        )

    def _turn_write(
        self, turn: PreparedTurn, response: StoredResponse, prefix: PrefixWrite | None
    ) -> TurnWrite:
        return TurnWrite(
            response=response,
            expires_at=self.expires_at(turn),
            input_items=turn.request.input,
            output_items=response.output,
            prefix=prefix,
        )

    async def _write(self, turn: PreparedTurn, response: StoredResponse, prefix: PrefixWrite | None) -> None:
        """Commit a finished turn whole, in one unit of work: its row (inserted, or the open one moved on
        from in progress), items and prefix record, and in a conversation the append that moves its head
        and frees its lock (a failed turn only frees it). LeaseLost if the open row was finalized
        elsewhere meanwhile (nothing is written then)."""
        conversation = None
        if turn.conversation is not None and turn.request.conversation_id is not None:
            joins = response.status != "failed"
            conversation = ConversationAppend(
                turn.request.conversation_id, turn.conversation.next_position, joins
            )
        await self.turns.write(self._turn_write(turn, response, prefix), conversation, opened=turn.opened)

    async def _open(self, turn: PreparedTurn, status: str) -> StoredResponse:
        """Insert the turn's row (with its input and a lease) before its id leaves the service."""
        response = self._response(turn, status, [], None)
        lease = time.time() + self.settings.turn_lease_seconds
        turn.thread = await self.turns.open(self._turn_write(turn, response, None), lease)
        turn.opened = True
        return response

    async def fail(self, turn: PreparedTurn, exc: BaseException, output: list[Item]) -> StoredResponse:
        """Record an open turn that cannot complete as failed, free its conversation, and return the
        failed response. Never raises: if the database cannot take the write, the row keeps its lease
        and the reaper fails it once the lease runs out."""
        failed = self._response(turn, "failed", output, None)
        # The response object's error code is a closed set; the stream's error event carries the precise one.
        failed.error = {"code": "server_error", "message": _client_message(exc)}
        if turn.opened:
            # With what was generated, unless that is what the database refused.
            for attempt in [output, []] if output else [[]]:
                failed.output = attempt
                try:
                    await self._write(turn, failed, None)
                    return failed
                except LeaseLost:
                    return failed
                except Exception:
                    log.exception("could not record %s as failed", turn.response_id)
        await self.release(turn)
        return failed

    async def answer_streamed(self, turn: PreparedTurn, stream: TurnStream) -> None:
        """Run a started background turn whose events go to `stream` (which the caller ends)."""
        stream.emit(
            {"type": "response.in_progress", "response": self._response(turn, "in_progress", [], None)}
        )
        try:
            chat, sent = await self._held(turn, self._send(turn, self.backend.open_chat_stream))
        except BaseException as exc:
            await self._end_failed(turn, stream, exc, [])
            if not isinstance(exc, Exception):
                raise
            return
        await self._produce(turn, chat, sent, stream)

    async def _produce(self, turn: PreparedTurn, chat: ChatStream, sent: Sent, stream: TurnStream) -> None:
        builder = OutputBuilder()
        try:
            reply = await self._held(turn, _relay(chat, builder, stream.emit))
            output = builder.finish(_status(reply))
            for event in builder.drain():
                stream.emit(event)
            result = await self._complete(turn, reply, sent, output)
            if not turn.request.store and turn.history is not None:
                stream.unstored = UnstoredTurn(
                    result.response, (*turn.history, (False, turn.request.input), (True, output))
                )
            stream.emit({"type": f"response.{result.response.status}", "response": result.response})
        except BaseException as exc:
            await self._end_failed(turn, stream, exc, _partial(builder))
            if not isinstance(exc, Exception):
                raise
        finally:
            await chat.aclose()
            stream.end()

    async def _end_failed(
        self, turn: PreparedTurn, stream: TurnStream, exc: BaseException, output: list[Item]
    ) -> None:
        """Record a running turn that cannot complete as failed and end its stream with `error` and
        `response.failed`; one cancelled meanwhile (from any replica) ends it with the cancelled response."""
        if isinstance(exc, ConvstateError):
            log.warning("streamed turn %s failed: %s", turn.response_id, exc.message)
        elif isinstance(exc, Exception):
            log.error("streamed turn %s failed", turn.response_id, exc_info=exc)
        failed = await self.fail(turn, exc, output)
        if isinstance(exc, LeaseLost) and (cancelled := await self.cancelled(turn)) is not None:
            await self.release(turn)
            stream.emit({"type": terminal_event_type(cancelled.status), "response": cancelled})
            return
        stream.emit(_error_event(exc))
        stream.emit({"type": "response.failed", "response": failed})

    async def cancelled(self, turn: PreparedTurn) -> StoredResponse | None:
        """The turn's response if it was cancelled; None otherwise, or if the database cannot say."""
        try:
            stored = await self.responses.get(turn.tenant, turn.response_id)
        except Exception:
            log.warning("could not read %s back", turn.response_id, exc_info=True)
            return None
        return stored if stored is not None and stored.status == "cancelled" else None

    # --- what a running turn holds ------------------------------------------------------------------

    async def _held(self, turn: PreparedTurn, work: Awaitable[T]) -> T:
        return await self._holding(
            work, turn.tenant, turn.response_id, turn.request.conversation_id, row=turn.opened
        )

    async def _holding(
        self, work: Awaitable[T], tenant: str, response_id: str, conversation_id: str | None, *, row: bool
    ) -> T:
        """Run `work` (every wait of a turn on the backend) while a heartbeat renews what the turn holds:
        its conversation's lock and, with `row`, its open row's lease. If either is lost, the work is
        cancelled and LeaseLost raised."""
        if not row and conversation_id is None:
            return await work
        task = asyncio.ensure_future(work)
        try:
            while not (await asyncio.wait({task}, timeout=HEARTBEAT_SECONDS))[0]:
                if not await self._renew(tenant, response_id, conversation_id, row=row):
                    raise LeaseLost()
            return task.result()
        finally:
            if not task.done():
                task.cancel()
                await asyncio.wait({task})

    async def _renew(self, tenant: str, response_id: str, conversation_id: str | None, *, row: bool) -> bool:
        until = time.time() + self.settings.turn_lease_seconds
        try:
            if row and not await self.responses.renew_lease(response_id, until):
                return False
            return conversation_id is None or await self.conversations.renew_turn(
                tenant, conversation_id, response_id, until
            )
        except Exception:
            # The database is out: keep generating. The lease covers a short outage; if the outage
            # outlasts it, the reaper fails the row and the write at the end learns so.
            log.warning("heartbeat of %s failed", response_id, exc_info=True)
            return True

    async def release(self, turn: PreparedTurn) -> None:
        """Free the turn's conversation if the turn still holds it."""
        if turn.request.conversation_id is not None:
            await self._release(turn.tenant, turn.request.conversation_id, turn.response_id)

    async def _release(self, tenant: str, conversation_id: str, response_id: str) -> None:
        try:
            async with unit_of_work(self.conversations.engine) as uow:
                await self.conversations.release_turn(uow, tenant, conversation_id, response_id)
        except Exception:
            log.warning(
                "could not free %s from %s; its lease will", conversation_id, response_id, exc_info=True
            )

    # --- background mode ----------------------------------------------------------------------------

    async def _enqueue(self, turn: PreparedTurn) -> TurnResult:
        """Store the response as queued (readable at once, from any replica) and hand it to the runner."""
        queued = await self._open(turn, "queued")
        self.background.submit(turn)
        return TurnResult(queued, turn.decision, None, 0)

    # --- shutdown -----------------------------------------------------------------------------------

    async def drain(self, grace: float) -> None:
        """Stop taking turns (new ones get 503, readiness fails) and let those in flight finish within
        `grace` seconds; the rest are cancelled, and each records itself failed and frees its
        conversation."""
        await self.tasks.drain(grace)

    async def aclose(self) -> None:
        """The end of the process's lifespan: drains, unless a signal already did."""
        await self.drain(self.settings.shutdown_grace_seconds)


async def _relay(chat: ChatStream, builder: OutputBuilder, emit: Callable[[Event], None]) -> ChatReply:
    """Forward the backend's deltas as stream events; the reply once the backend is done."""
    async for delta in chat.deltas():
        builder.reasoning_delta(delta.reasoning)
        builder.text_delta(delta.content, delta.logprobs)
        for index, call_id, name, arguments in delta.tool_calls:
            builder.tool_call_delta(index, call_id, name, arguments)
        for event in builder.drain():
            emit(event)
    return chat.reply()


def _partial(builder: OutputBuilder) -> list[Item]:
    """What was generated before a failure, closed as incomplete; nothing if the builder itself broke."""
    try:
        return builder.finish("incomplete")
    except Exception:
        return []


def _error_event(exc: BaseException) -> Event:
    """The stream's `error` event: OpenAI puts code, message and param at the top, the Open Responses
    specification in `error`; both are sent, so both kinds of client read it."""
    ours = exc if isinstance(exc, ConvstateError) else None
    error = {
        "type": ours.type if ours else "server_error",
        "code": (ours.code if ours else None) or "server_error",
        "message": _client_message(exc),
        "param": ours.param if ours else None,
    }
    return {"type": "error", **{key: error[key] for key in ("code", "message", "param")}, "error": error}


def _client_message(exc: BaseException) -> str:
    """Our own errors' messages are written for clients; anything else is described, not quoted."""
    if isinstance(exc, ConvstateError):
        return exc.message
    return UNEXPECTED if isinstance(exc, Exception) else SHUT_DOWN


def _count(reply: ChatReply, decision: Decision) -> None:
    metrics.labelled(metrics.decisions, decision.path, decision.label).inc()
    metrics.labelled(metrics.bytes_forwarded, decision.path).inc(reply.bytes_sent)
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
        session_token=reply.session_token,
    )
