"""The canary: off the hot path, render a cache-path turn's whole history in full and check the new
handle's prefix hash against it. A mismatch means the cache path and the full path disagree: the record
is invalidated (its children go back to the full path) and the mismatch is counted and logged."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from service import metrics
from service.backends.client import BackendClient, PromptCacheHandle
from service.domain.items import Segment
from service.domain.plan import TurnPlan
from service.domain.prefix import token_digest
from service.store.conversations import ConversationStore
from service.store.responses import ResponseStore, StoredResponse

log = logging.getLogger("convstate.canary")


class Canary:
    def __init__(
        self, backend: BackendClient, responses: ResponseStore, conversations: ConversationStore
    ) -> None:
        self.backend = backend
        self.responses = responses
        self.conversations = conversations

    async def check(
        self, tenant: str, plan: TurnPlan, response: StoredResponse, handle: PromptCacheHandle
    ) -> None:
        try:
            history = await self._history(tenant, response)
            body = {**plan.render_body(history), "add_generation_prompt": False}
            tokens = await self.backend.tokenize_chat(body)
        except Exception:
            log.exception("canary render failed for %s", response.id)
            return
        expected = token_digest(tokens[: handle.safe_tokens])
        matched = len(tokens) >= handle.safe_tokens and expected == handle.prefix_hash
        metrics.canary_checks.labels("match" if matched else "mismatch").inc()
        if not matched:
            log.error(
                "canary mismatch for %s: handle prefix_hash=%s full render=%s",
                response.id,
                handle.prefix_hash,
                expected,
            )
            await self.responses.invalidate_record(tenant, response.id, "canary_mismatch")

    async def _history(self, tenant: str, response: StoredResponse) -> Sequence[Segment]:
        """The history through this response's output: its lineage, or its conversation up to it (a later
        turn may already have appended to the conversation)."""
        if response.conversation_id is None:
            return await self.responses.history(tenant, response.id)
        segments = await self.conversations.history(tenant, response.conversation_id)
        last = response.output[-1]["id"]
        ends = [i for i, (_, items) in enumerate(segments) if any(item["id"] == last for item in items)]
        return segments[: ends[0] + 1] if ends else []
