"""The replay cache's I/O: single flight over its rows (store/replay.py), the model fingerprint it keys on,
and the cached chat call a Responses turn sends through.

One request through the cache (`ReplayCache.resolve`): a ready entry is a hit (one SELECT); else the first
to claim the key is the owner, who asks the backend while renewing its lease and stores the reply only if
the call succeeded (`leased`, `fill`); the others poll the row until the reply is there (a coalesced hit),
or the claim is gone (they claim it), or `replay_wait_seconds` pass (they ask the backend themselves,
without storing). Before the key is made, a new fingerprint for the model deletes the entries made under
any other (once per change per process, `note_fingerprint`).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import orjson

from service import metrics, observe
from service.backends.client import BackendClient, ChatReply
from service.config import Settings
from service.domain.fingerprint import BackendModelInfo
from service.domain.replay import CachePolicy, Endpoint, Mode, ReplayKey, replay_key, turn_body
from service.store.replay import READY, Claim, Found, ReplayStore

log = logging.getLogger("convstate.replay")
T = TypeVar("T")

# A waiter polls the row at this interval, doubling up to the ceiling.
FIRST_POLL_SECONDS = 0.02
MAX_POLL_SECONDS = 0.25
# A model this process has not seen yet, distinct from None (a served model with no fingerprint).
_UNSEEN = object()


@dataclass(frozen=True, slots=True)
class Hit:
    reply: dict[str, Any]
    coalesced: bool


@dataclass(frozen=True, slots=True)
class Owned:
    claim: Claim


@dataclass(frozen=True, slots=True)
class TimedOut:
    pass


class ReplayCache:
    def __init__(self, settings: Settings, backend: BackendClient, store: ReplayStore) -> None:
        self.settings = settings
        self.backend = backend
        self.store = store
        self._fingerprints: dict[str, object] = {}

    async def key(self, endpoint: Endpoint, body: dict[str, Any], policy: CachePolicy) -> ReplayKey:
        """The request's key under the model's current card; first, entries of a replaced model go."""
        model = str(body.get("model"))
        backend = await self.backend.model_info(model)
        await self.note_fingerprint(model, backend)
        return replay_key(endpoint, body, backend, policy.force)

    async def note_fingerprint(self, model: str, backend: BackendModelInfo | None) -> None:
        """The first time this process sees a model's fingerprint, and whenever it changes, entries made
        under any other fingerprint go: a reloaded model never replays its predecessor's answers."""
        if backend is None:
            return  # not served now, or the backend is unreachable: nothing is known to have changed
        fingerprint = backend.backend_fingerprint
        if self._fingerprints.get(model, _UNSEEN) == fingerprint:
            return
        removed = await self.store.drop_other_fingerprints(model, fingerprint)
        self._fingerprints[model] = fingerprint
        if removed:
            log.info("model %s changed fingerprint: %d replay entries removed", model, removed)
            metrics.replay_removed.labels("fingerprint").inc(removed)

    async def resolve(
        self, tenant: str, endpoint: Endpoint, key: ReplayKey, policy: CachePolicy
    ) -> Hit | Owned | TimedOut:
        """A stored (or, after waiting, a just stored) reply, or the claim to ask the backend for it."""
        refresh = policy.mode is Mode.REFRESH
        claim = Claim(
            tenant=tenant,
            key=key.key,
            endpoint=str(endpoint),
            model=key.model,
            fingerprint=key.fingerprint,
            request=key.canonical,
            owner=uuid.uuid4().hex,
        )
        deadline = time.monotonic() + self.settings.replay_wait_seconds
        found = None if refresh else await self.store.find(tenant, key.key)
        waited, poll = False, FIRST_POLL_SECONDS
        while True:
            now = time.time()
            if found is not None and _live(found, now) and found.status == READY and found.result is not None:
                return Hit(found.result, coalesced=waited)
            if found is None or not _live(found, now):
                lease = self.settings.replay_lease_seconds
                if await self.store.claim(claim, now, lease, refresh=refresh and not waited):
                    return Owned(claim)
            if time.monotonic() >= deadline:
                return TimedOut()
            await asyncio.sleep(poll)
            waited, poll = True, min(2 * poll, MAX_POLL_SECONDS)
            found = await self.store.find(tenant, key.key)

    @asynccontextmanager
    async def leased(self, claim: Claim) -> AsyncIterator[None]:
        """Renew the claim's lease while the block runs; if the block fails, give the claim up so a waiter
        takes it at once (a dead process's claim lapses with its lease)."""
        lease = self.settings.replay_lease_seconds

        async def renew() -> None:
            while True:
                await asyncio.sleep(lease / 3)
                try:
                    if not await self.store.renew(claim.tenant, claim.key, claim.owner, time.time() + lease):
                        return
                except Exception:
                    log.warning("could not renew the lease of replay entry %s", claim.key, exc_info=True)

        renewing = asyncio.ensure_future(renew())
        try:
            yield
        except BaseException:
            await self.give_up(claim)
            raise
        finally:
            renewing.cancel()

    async def give_up(self, claim: Claim) -> None:
        try:
            await asyncio.shield(self.store.abandon(claim.tenant, claim.key, claim.owner))
        except Exception:
            log.warning("could not give up replay entry %s; its lease will", claim.key, exc_info=True)

    async def fill(self, claim: Claim, reply: dict[str, Any]) -> None:
        size = len(orjson.dumps(reply))
        ttl = self.settings.replay_ttl_seconds
        if not await self.store.fill(claim.tenant, claim.key, claim.owner, reply, size, time.time(), ttl):
            log.warning("replay entry %s was taken over before it was filled; not stored", claim.key)

    async def decide(
        self, tenant: str, endpoint: Endpoint, key: ReplayKey, policy: CachePolicy
    ) -> tuple[Hit | Owned | TimedOut, str]:
        """`resolve`, counted in the metrics: the outcome and how the request is answered
        (`x-convstate-cache`). Whoever acts on the outcome counts nothing more."""
        outcome = await self.resolve(tenant, endpoint, key, policy)
        if isinstance(outcome, Hit):
            count(endpoint, "coalesced" if outcome.coalesced else "hit")
            return outcome, "hit"
        if isinstance(outcome, TimedOut):
            result = "wait_timeout"
        else:
            result = "refresh" if policy.mode is Mode.REFRESH else "miss"
        count(endpoint, result)
        return outcome, result

    async def through(
        self,
        tenant: str,
        endpoint: Endpoint,
        key: ReplayKey,
        policy: CachePolicy,
        *,
        call: Callable[[], Awaitable[T]],
        stored: Callable[[T], dict[str, Any]],
        replay: Callable[[dict[str, Any]], T],
    ) -> tuple[T, str]:
        """A whole reply through the cache (`call` asks the backend; `stored` is what of its answer is
        kept, `replay` what a hit answers), and how it was answered (`x-convstate-cache`)."""
        outcome, result = await self.decide(tenant, endpoint, key, policy)
        if isinstance(outcome, Hit):
            return replay(outcome.reply), result
        if isinstance(outcome, TimedOut):
            return await call(), result
        async with self.leased(outcome.claim):
            answer = await call()
            await self.fill(outcome.claim, stored(answer))
        return answer, result

    def chat(
        self, tenant: str, policy: CachePolicy
    ) -> Callable[[dict[str, Any], dict[str, str]], Awaitable[ChatReply]]:
        """The backend's chat call for a Responses turn, through the cache: what the pipeline sends with
        in place of `BackendClient.chat`. How it was answered is noted on the request (observe.py)."""

        async def send(body: dict[str, Any], headers: dict[str, str]) -> ChatReply:
            key = await self.key(Endpoint.RESPONSES, turn_body(body), policy)
            if key.refused is not None:
                count(Endpoint.RESPONSES, "uncacheable")
                observe.note_cache("uncacheable")
                return await self.backend.chat(body, headers)
            reply, result = await self.through(
                tenant,
                Endpoint.RESPONSES,
                key,
                policy,
                call=lambda: self.backend.chat(body, headers),
                stored=_reply_record,
                replay=_replayed_reply,
            )
            observe.note_cache(result)
            return reply

        return send


# What of a chat reply a Responses turn keeps: everything its output and usage are made of. The handle
# and the bytes sent belong to the call that made it; a replayed reply has neither.
TURN_REPLY_FIELDS = (
    "content",
    "reasoning",
    "tool_calls",
    "finish_reason",
    "prompt_tokens",
    "completion_tokens",
    "reasoning_tokens",
    "prompt_digest",
    "logprobs",
)


def _reply_record(reply: ChatReply) -> dict[str, Any]:
    return {name: getattr(reply, name) for name in TURN_REPLY_FIELDS}


def _replayed_reply(record: dict[str, Any]) -> ChatReply:
    """Every prompt token counted as cached: none was computed."""
    kept = {name: record[name] for name in TURN_REPLY_FIELDS}
    return ChatReply(**kept, cached_tokens=kept["prompt_tokens"], handle=None, bytes_sent=0)


def count(endpoint: Endpoint, result: str) -> None:
    metrics.replay_requests.labels(str(endpoint), result).inc()


def _live(found: Found, now: float) -> bool:
    """A ready entry not yet expired, or a pending one whose owner still holds its lease."""
    if found.status == READY:
        return found.expires_at > now
    return found.lease_expires_at is not None and found.lease_expires_at >= now
