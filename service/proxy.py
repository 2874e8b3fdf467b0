"""The caching proxy: POST /v1/chat/completions and /v1/completions, forwarded to the backend with the
tenant's cache salt, answered from the replay cache when the request asks for it (or its tenant opted in).

One request (`Proxy.serve`):

1. **Policy** (`domain.replay.cache_policy`): `use`, `bypass` or `refresh`, and whether to `force`.
   `bypass` forwards at once and touches no row.
2. **Key**: the backend's model card (the client's `/v1/models` cache, no extra call in the common case)
   gives the model's identity; `domain.replay.replay_key` hashes it with the canonical request. A new
   fingerprint for the model first deletes the entries made under any other (once per change per
   process). A request the cache refuses (sampling without a seed, an unidentified model) is forwarded.
3. **Single flight** over the entry's row (store/replay.py): a ready entry is a hit (one SELECT); else
   the first to claim the key asks the backend while renewing its lease, and stores the reply only if
   the call succeeded; the others poll the row until the reply is there, or the claim is gone (they
   claim it), or `replay_wait_seconds` pass (they ask the backend themselves, without storing).
4. **Answer**: a hit is the stored reply with a new id and every prompt token counted as cached; a
   streamed request gets it as chunks. A streamed miss is relayed chunk by chunk as the backend sends
   it, assembled, and stored once it ended whole.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import orjson

from service import metrics
from service.backends.client import BackendClient
from service.config import Settings
from service.domain.completions import Assembler, replay_chunks
from service.domain.fingerprint import BackendModelInfo
from service.domain.replay import (
    EXTENSION,
    CachePolicy,
    Endpoint,
    Mode,
    ReplayKey,
    cache_policy,
    id_prefix,
    replay_key,
    replayed,
)
from service.store.replay import READY, Claim, Found, ReplayStore
from service.store.tenants import TenantStore

log = logging.getLogger("convstate.proxy")

PATHS = {Endpoint.CHAT: "/v1/chat/completions", Endpoint.COMPLETIONS: "/v1/completions"}
# A waiter polls the row at this interval, doubling up to the ceiling.
FIRST_POLL_SECONDS = 0.02
MAX_POLL_SECONDS = 0.25
# An unknown model's fingerprint, distinct from None (a served model with no fingerprint).
_UNSEEN = object()


@dataclass(slots=True)
class Answer:
    """How a request was answered (`cache`: the `x-convstate-cache` header) and with what: a whole
    reply, or the chunks of a stream."""

    cache: str
    key: str | None
    body: dict[str, Any] | None = None
    chunks: AsyncIterator[dict[str, Any]] | None = None


@dataclass(frozen=True, slots=True)
class _Call:
    """One request as it goes to the backend."""

    endpoint: Endpoint
    body: dict[str, Any]
    stream: bool
    include_usage: bool
    headers: dict[str, str]


class Proxy:
    def __init__(
        self, settings: Settings, backend: BackendClient, tenants: TenantStore, store: ReplayStore
    ) -> None:
        self.settings = settings
        self.backend = backend
        self.tenants = tenants
        self.store = store
        self._fingerprints: dict[str, object] = {}

    async def serve(
        self,
        tenant: str,
        endpoint: Endpoint,
        body: dict[str, Any],
        header: str | None,
        request_id: str | None,
    ) -> Answer:
        stored = await self.tenants.current(tenant)
        policy = cache_policy(header, body.get(EXTENSION), stored.replay_cache)
        forwarded = {name: value for name, value in body.items() if name != EXTENSION}
        forwarded["cache_salt"] = stored.cache_salt
        stream = forwarded.get("stream") is True
        options = forwarded.get("stream_options")
        call = _Call(
            endpoint,
            forwarded,
            stream,
            include_usage=isinstance(options, dict) and bool(options.get("include_usage")),
            headers={"x-request-id": request_id} if request_id else {},
        )
        if policy.mode is Mode.BYPASS:
            return await self._uncached(call, "bypass", None)
        model = str(body.get("model"))
        backend = await self.backend.model_info(model)
        await self._note_fingerprint(model, backend)
        key = replay_key(endpoint, body, backend, policy.force)
        if key.refused is not None:
            return await self._uncached(call, "uncacheable", key.key)
        return await self._single_flight(tenant, call, key, policy)

    # --- the cache ----------------------------------------------------------------------------------

    async def _note_fingerprint(self, model: str, backend: BackendModelInfo | None) -> None:
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

    async def _single_flight(self, tenant: str, call: _Call, key: ReplayKey, policy: CachePolicy) -> Answer:
        refresh = policy.mode is Mode.REFRESH
        claim = Claim(
            tenant=tenant,
            key=key.key,
            endpoint=str(call.endpoint),
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
                result = "coalesced" if waited else "hit"
                metrics.replay_requests.labels(str(call.endpoint), result).inc()
                return self._hit(call, key, found.result)
            if found is None or not _live(found, now):
                lease = self.settings.replay_lease_seconds
                if await self.store.claim(claim, now, lease, refresh=refresh and not waited):
                    return await self._lead(call, key, claim, "refresh" if refresh else "miss")
            if time.monotonic() >= deadline:
                return await self._uncached(call, "wait_timeout", key.key)
            await asyncio.sleep(poll)
            waited, poll = True, min(2 * poll, MAX_POLL_SECONDS)
            found = await self.store.find(tenant, key.key)

    def _hit(self, call: _Call, key: ReplayKey, stored: dict[str, Any]) -> Answer:
        reply = replayed(call.endpoint, stored, id_prefix(call.endpoint) + uuid.uuid4().hex, int(time.time()))
        if not call.stream:
            return Answer("hit", key.key, body=reply)
        return Answer(
            "hit", key.key, chunks=_iterate(replay_chunks(call.endpoint, reply, call.include_usage))
        )

    async def _lead(self, call: _Call, key: ReplayKey, claim: Claim, result: str) -> Answer:
        """This request owns the key: ask the backend, keep the lease meanwhile, store a whole reply."""
        metrics.replay_requests.labels(str(call.endpoint), result).inc()
        path = PATHS[call.endpoint]
        if not call.stream:
            async with self._leased(claim):
                reply, _ = await self.backend.forward(path, call.body, call.headers)
                await self._fill(claim, reply)
            return Answer(result, key.key, body=reply)
        # The backend always reports usage: the stored reply needs it even if this client did not ask.
        options = call.body.get("stream_options")
        body = {
            **call.body,
            "stream_options": {**(options if isinstance(options, dict) else {}), "include_usage": True},
        }
        try:
            events = await self.backend.forward_stream(path, body, call.headers)
        except BaseException:
            await self._give_up(claim)
            raise
        return Answer(result, key.key, chunks=self._relay(call, claim, events.events()))

    async def _relay(
        self, call: _Call, claim: Claim, events: AsyncIterator[dict[str, Any]]
    ) -> AsyncIterator[dict[str, Any]]:
        """Pass the backend's chunks on as they come (the usage chunk only if the client asked for it),
        and store the reply they make once the stream has ended whole."""
        async with self._leased(claim):
            assembler = Assembler(call.endpoint)
            async for chunk in events:
                assembler.feed(chunk)
                if chunk.get("choices") or call.include_usage:
                    yield chunk
            await self._fill(claim, assembler.reply())

    async def _fill(self, claim: Claim, reply: dict[str, Any]) -> None:
        size = len(orjson.dumps(reply))
        ttl = self.settings.replay_ttl_seconds
        if not await self.store.fill(claim.tenant, claim.key, claim.owner, reply, size, time.time(), ttl):
            log.warning("replay entry %s was taken over before it was filled; not stored", claim.key)

    @asynccontextmanager
    async def _leased(self, claim: Claim) -> AsyncIterator[None]:
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
            await self._give_up(claim)
            raise
        finally:
            renewing.cancel()

    async def _give_up(self, claim: Claim) -> None:
        try:
            await asyncio.shield(self.store.abandon(claim.tenant, claim.key, claim.owner))
        except Exception:
            log.warning("could not give up replay entry %s; its lease will", claim.key, exc_info=True)

    # --- without the cache --------------------------------------------------------------------------

    async def _uncached(self, call: _Call, result: str, key: str | None) -> Answer:
        metrics.replay_requests.labels(str(call.endpoint), result).inc()
        path = PATHS[call.endpoint]
        if call.stream:
            events = await self.backend.forward_stream(path, call.body, call.headers)
            return Answer(result, key, chunks=events.events())
        reply, _ = await self.backend.forward(path, call.body, call.headers)
        return Answer(result, key, body=reply)


def _live(found: Found, now: float) -> bool:
    """A ready entry not yet expired, or a pending one whose owner still holds its lease."""
    if found.status == READY:
        return found.expires_at > now
    return found.lease_expires_at is not None and found.lease_expires_at >= now


async def _iterate(chunks: list[dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
    for chunk in chunks:
        yield chunk
