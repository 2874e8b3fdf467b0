"""The turn plan: from one object of render inputs, the decision, the exact backend body and the
fingerprint, so that what is hashed is what is sent.

`plan_turn` is pure. The pipeline loads what it needs (the parent with its prefix record, the backend's
model card, the tenant's salt), calls it, and sends `plan.cache_body` if the plan has one, else
`plan.full_body(history)`; the prefix record it stores takes its parts from `plan.sent_parts(body)`,
computed from that very body.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import xxhash

from service.domain.fingerprint import SAMPLING_FIELDS, BackendModelInfo, combined_fingerprint, turn_parts
from service.domain.items import ChatMessage, Item, Segment, history_messages, segment_messages
from service.domain.policy import (
    BackendMode,
    Decision,
    DecisionInputs,
    ParentPrefix,
    Path,
    decide,
    reseedable,
)
from service.errors import InvalidRequest

# A parent in one of these states has no output yet: a child would render a history without it.
IN_FLIGHT = frozenset({"queued", "in_progress"})
# States whose output is whole as stored: `incomplete` was cut by max_output_tokens, and its handle
# covers exactly the text that was stored. A failed or cancelled turn never offers its handle.
OFFERS_HANDLE = frozenset({"completed", "incomplete"})
# llm-d's session-affinity hints (see service/backends/reference/router.py for what llm-d does).
SESSION_ID_HEADER = "x-session-id"
SESSION_TOKEN_HEADER = "x-session-token"
SESSION_COOKIE = "llm-d-session"


@dataclass(frozen=True, slots=True)
class ParentState:
    """What the plan needs of the parent turn: its status, its output (the messages that follow a handle
    that ends before it) and its prefix record."""

    id: str
    status: str
    output: Sequence[Item]
    prefix: ParentPrefix | None


@dataclass(frozen=True, slots=True)
class RenderInputs:
    """Everything that decides what the backend renders for this turn, as it will be sent.

    `settings` are the chat-completions fields besides model, messages, salt and cache reference
    (domain.chat.chat_options of the request), already in wire form and key order."""

    model: str
    instructions: str | None
    input: Sequence[Item]
    settings: Mapping[str, Any]
    cache_salt: str


@dataclass(frozen=True, slots=True)
class TurnInputs:
    render: RenderInputs
    mode: BackendMode
    store: bool
    backend: BackendModelInfo | None
    parent: ParentState | None
    has_parent: bool  # a conversation's first turn has no parent even when it holds items
    conversation_version: int | None
    now: float
    canary: bool = False
    invalidated_since: float | None = None
    # The lineage's first response (this turn's own id for a first turn): names its llm-d session.
    lineage_root: str | None = None
    # Ask the backend for the token ids of a stored turn (for its token artifact).
    token_ids: bool = False


@dataclass(frozen=True, slots=True)
class TurnPlan:
    decision: Decision
    render: RenderInputs
    backend: BackendModelInfo | None
    input_messages: list[ChatMessage]
    base: dict[str, Any]
    # The fingerprint of this turn as decided on (from its input; the parent's history is covered by
    # the parent's record). The record stores sent_parts(body) instead, from what was really sent.
    parts: dict[str, str | None]
    cache_body: dict[str, Any] | None = field(default=None)
    # Routing hints for llm-d, sent as headers with whichever body goes.
    headers: dict[str, str] = field(default_factory=dict)
    # When the parent's handle fails or is gone: the cache body without its prefix, to be completed by
    # `seed_body` with the parent's token ids (their fingerprint must be `seed_fingerprint`).
    seed_base: dict[str, Any] | None = None
    seed_fingerprint: str | None = None

    def full_body(self, history: Sequence[Segment]) -> dict[str, Any]:
        """The whole history, then this turn's input, with the request's instructions first."""
        messages = history_messages(self.render.instructions, history)
        return {**self.base, "messages": [*messages, *self.input_messages]}

    def render_body(self, history: Sequence[Segment]) -> dict[str, Any]:
        """A full render of `history` alone, for /tokenize: what the backend would render, nothing sampled."""
        body = {
            key: value
            for key, value in self.base.items()
            if key != "prompt_cache" and key not in SAMPLING_FIELDS
        }
        body["messages"] = history_messages(self.render.instructions, history)
        return body

    def seed_body(self, prompt_ids: Sequence[int], output_ids: Sequence[int]) -> dict[str, Any]:
        """The seed base with the parent's ids in place of its handle (docs/backend-protocol.md)."""
        assert self.seed_base is not None
        cache = self.seed_base["prompt_cache"]
        seed = {**cache["seed"], "prompt_token_ids": prompt_ids, "output_token_ids": output_ids}
        return {**self.seed_base, "prompt_cache": {**cache, "seed": seed}}

    def sent_parts(self, body: Mapping[str, Any]) -> dict[str, str | None]:
        """The fingerprint of `body`, which this plan built: the record's parts. The cache body adds to the
        input only the parent's assistant output, which holds no media, so its parts are the plan's own
        (no second hashing on the hot path); a full body is hashed over all it sends."""
        if body is self.cache_body:
            return self.parts
        return _parts(self.backend, self.render, body["messages"])


def session_id(lineage_root: str) -> str:
    """A stable llm-d session id per lineage that reveals no response id."""
    return "cs-" + xxhash.xxh3_64_hexdigest(lineage_root.encode())


def cache_salt_id(salt: str) -> str:
    """The salt's identity for the fingerprint: records never hold the salt itself."""
    return xxhash.xxh3_64_hexdigest(salt.encode())


def _parts(
    backend: BackendModelInfo | None, render: RenderInputs, messages: Sequence[Mapping[str, Any]]
) -> dict[str, str | None]:
    return turn_parts(
        backend, cache_salt_id(render.cache_salt), render.instructions, render.settings, messages
    )


def plan_turn(inputs: TurnInputs) -> TurnPlan:
    render, parent = inputs.render, inputs.parent
    if parent is not None and parent.status in IN_FLIGHT:
        raise InvalidRequest(
            f"Previous response with id '{parent.id}' is still {parent.status.replace('_', ' ')}; "
            "continue from it once it has finished.",
            param="previous_response_id",
            code="previous_response_in_progress",
        )
    input_messages = segment_messages(render.input)
    base: dict[str, Any] = {"model": render.model, "cache_salt": render.cache_salt, **render.settings}
    if inputs.store and inputs.token_ids:
        # The ids go to the token artifacts (reseed, append-safety, diagnostics); a sampling field.
        base["return_token_ids"] = True
    if inputs.mode is not BackendMode.FULL and inputs.store:
        base["prompt_cache"] = {"register": True}
    if inputs.mode is BackendMode.AFFINITY and inputs.lineage_root is not None:
        # The request's `user`, as vLLM's chat completions take it, names the lineage's session for
        # whatever reads the body (gateway logs, schedulers); a sampling field. The client's own
        # `user` or `safety_identifier` (already in the settings) is an identity it chose: kept.
        base.setdefault("user", session_id(inputs.lineage_root))
    parts = _parts(inputs.backend, render, input_messages)
    backend = inputs.backend
    decision_inputs = DecisionInputs(
        mode=inputs.mode,
        has_parent=inputs.has_parent,
        store=inputs.store,
        parent=parent.prefix if parent is not None else None,
        parent_completed=parent is not None and parent.status in OFFERS_HANDLE,
        current_parts=parts,
        backend_epoch=backend.epoch if backend else None,
        now=inputs.now,
        invalidated_since=inputs.invalidated_since,
        conversation_version=inputs.conversation_version,
        canary=inputs.canary,
    )
    decision = decide(decision_inputs)
    headers = _routing_headers(inputs, decision)
    plan = TurnPlan(decision, render, backend, input_messages, base, parts, headers=headers)
    if parent is None or parent.prefix is None:
        return plan
    record = parent.prefix
    marginal = [] if record.covers_output else segment_messages(parent.output, output=True)
    register = "prompt_cache" in base
    cache_body = None
    if decision.path is Path.CACHE_REF:
        cache_body = {
            **base,
            "messages": [*marginal, *input_messages],
            "prompt_cache": {
                "ref": record.handle_ref,
                "tokens": record.safe_tokens,
                "prefix_hash": record.prefix_hash,
                "fingerprint": record.backend_fingerprint,
                "register": register,
            },
        }
    seed_base = None
    if backend is not None and backend.seeds and reseedable(decision_inputs, decision):
        seed_base = {
            **base,
            "messages": [*marginal, *input_messages],
            "prompt_cache": {
                "seed": {"covers_output": record.covers_output},
                "fingerprint": record.backend_fingerprint,
                "register": register,
            },
        }
    return TurnPlan(
        decision,
        render,
        backend,
        input_messages,
        base,
        parts,
        cache_body,
        headers,
        seed_base,
        combined_fingerprint(record.fingerprint_parts or {}) if seed_base is not None else None,
    )


def _routing_headers(inputs: TurnInputs, decision: Decision) -> dict[str, str]:
    """In affinity mode: the lineage's session id always, and the parent's session token while its
    record holds (an invalidation, a fingerprint change or an edit decides full and drops it)."""
    if inputs.mode is not BackendMode.AFFINITY or inputs.lineage_root is None:
        return {}
    headers = {SESSION_ID_HEADER: session_id(inputs.lineage_root)}
    parent = inputs.parent
    token = parent.prefix.session_token if parent is not None and parent.prefix is not None else None
    if decision.path is Path.AFFINITY and token is not None:
        # llm-d reads it as a header (earlier versions) or its cookie (current ones).
        headers[SESSION_TOKEN_HEADER] = token
        headers["cookie"] = f"{SESSION_COOKIE}={token}"
    return headers
