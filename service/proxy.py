"""The caching proxy: POST /v1/chat/completions and /v1/completions, forwarded to the backend with the
tenant's cache salt, answered from the replay cache when the request asks for it (or its tenant opted in).

One request (`Proxy.serve`):

1. **Policy** (`domain.replay.cache_policy`): `use`, `bypass` or `refresh`, and whether to `force`.
   A named prefix (`convstate_prefix`) is applied to the body first: what follows sees what is sent.
   `bypass` forwards at once and touches no row.
2. **Key** (`ReplayCache.key`): the model's identity from the backend's card and the canonical request.
   A request the cache refuses (sampling without a seed, an unidentified model) is forwarded.
3. **Single flight** (service/replay.py): a hit, or the claim to ask the backend, or a wait that ran out.
4. **Answer**: a hit is the stored reply with a new id and every prompt token counted as cached; a
   streamed request gets it as chunks. A streamed miss is relayed chunk by chunk as the backend sends
   it, assembled, and stored once it ended whole.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from service.backends.client import BackendClient
from service.config import Settings
from service.domain.completions import Assembler, replay_chunks
from service.domain.prefixes import EXTENSION as PREFIX
from service.domain.prefixes import apply_to_chat
from service.domain.replay import (
    EXTENSION,
    CachePolicy,
    Endpoint,
    Mode,
    ReplayKey,
    cache_policy,
    id_prefix,
    replayed,
)
from service.prefixes import Prefixes
from service.replay import Hit, ReplayCache, TimedOut, count
from service.store.replay import Claim
from service.store.tenants import TenantStore

PATHS = {Endpoint.CHAT: "/v1/chat/completions", Endpoint.COMPLETIONS: "/v1/completions"}


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

    @property
    def path(self) -> str:
        return PATHS[self.endpoint]


class Proxy:
    def __init__(
        self,
        settings: Settings,
        backend: BackendClient,
        tenants: TenantStore,
        cache: ReplayCache,
        prefixes: Prefixes,
    ) -> None:
        self.settings = settings
        self.backend = backend
        self.tenants = tenants
        self.cache = cache
        self.prefixes = prefixes

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
        if (named := body.get(PREFIX)) is not None:
            body = apply_to_chat(body, await self.prefixes.named(tenant, named))
        forwarded = {name: value for name, value in body.items() if name != EXTENSION}
        forwarded["cache_salt"] = stored.cache_salt
        options = forwarded.get("stream_options")
        call = _Call(
            endpoint,
            forwarded,
            stream=forwarded.get("stream") is True,
            include_usage=isinstance(options, dict) and bool(options.get("include_usage")),
            headers={"x-request-id": request_id} if request_id else {},
        )
        if policy.mode is Mode.BYPASS:
            return await self._uncached(call, "bypass", None)
        key = await self.cache.key(endpoint, body, policy)
        if key.refused is not None:
            return await self._uncached(call, "uncacheable", key.key)
        if not call.stream:
            reply, result = await self.cache.through(
                tenant,
                endpoint,
                key,
                policy,
                call=lambda: self._forward(call),
                stored=lambda reply: reply,
                replay=lambda stored: _fresh(endpoint, stored),
            )
            return Answer(result, key.key, body=reply)
        return await self._stream(tenant, call, key, policy)

    async def _forward(self, call: _Call) -> dict[str, Any]:
        reply, _ = await self.backend.forward(call.path, call.body, call.headers)
        return reply

    async def _stream(self, tenant: str, call: _Call, key: ReplayKey, policy: CachePolicy) -> Answer:
        outcome, result = await self.cache.decide(tenant, call.endpoint, key, policy)
        if isinstance(outcome, Hit):
            chunks = replay_chunks(call.endpoint, _fresh(call.endpoint, outcome.reply), call.include_usage)
            return Answer(result, key.key, chunks=_iterate(chunks))
        if isinstance(outcome, TimedOut):
            return await self._send(call, result, key.key)
        # The backend always reports usage: the stored reply needs it even if this client did not ask.
        options = call.body.get("stream_options")
        usage = {**(options if isinstance(options, dict) else {}), "include_usage": True}
        try:
            events = await self.backend.forward_stream(
                call.path, {**call.body, "stream_options": usage}, call.headers
            )
        except BaseException:
            await self.cache.give_up(outcome.claim)
            raise
        return Answer(result, key.key, chunks=self._relay(call, outcome.claim, events.events()))

    async def _relay(
        self, call: _Call, claim: Claim, events: AsyncIterator[dict[str, Any]]
    ) -> AsyncIterator[dict[str, Any]]:
        """Pass the backend's chunks on as they come (the usage chunk only if the client asked for it),
        and store the reply they make once the stream has ended whole."""
        async with self.cache.leased(claim):
            assembler = Assembler(call.endpoint)
            async for chunk in events:
                assembler.feed(chunk)
                if chunk.get("choices") or call.include_usage:
                    yield chunk
            await self.cache.fill(claim, assembler.reply())

    async def _uncached(self, call: _Call, result: str, key: str | None) -> Answer:
        """A request the cache does not see (bypassed or refused): counted here, then sent."""
        count(call.endpoint, result)
        return await self._send(call, result, key)

    async def _send(self, call: _Call, result: str, key: str | None) -> Answer:
        """The backend's answer as is, streamed or whole."""
        if call.stream:
            events = await self.backend.forward_stream(call.path, call.body, call.headers)
            return Answer(result, key, chunks=events.events())
        return Answer(result, key, body=await self._forward(call))


def _fresh(endpoint: Endpoint, stored: dict[str, Any]) -> dict[str, Any]:
    return replayed(endpoint, stored, id_prefix(endpoint) + uuid.uuid4().hex, int(time.time()))


async def _iterate(chunks: list[dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
    for chunk in chunks:
        yield chunk
