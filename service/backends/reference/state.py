"""Backend memory: the simulated automatic prefix cache and the prompt-cache handle registry."""

from __future__ import annotations

import secrets
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import xxhash

from service.backends.reference.render import Message, canonical_json
from service.domain.prefix import TokenDigest, pack_tokens


class PrefixCache:
    """vLLM-style automatic prefix caching over full blocks: a block's key chains its parent's key
    and its tokens, and the root is keyed by model and cache_salt so salts never share blocks."""

    def __init__(self, block_size: int, capacity_blocks: int) -> None:
        self.block_size = block_size
        self._capacity = capacity_blocks
        self._blocks: OrderedDict[bytes, None] = OrderedDict()

    def _keys(self, model: str, cache_salt: str | None, tokens: Sequence[int]) -> list[bytes]:
        packed = pack_tokens(tokens)
        width = 4 * self.block_size
        key = xxhash.xxh3_128_digest(canonical_json([model, cache_salt]).encode("utf-8"))
        keys = []
        for start in range(0, len(packed) - width + 1, width):
            key = xxhash.xxh3_128_digest(key + packed[start : start + width])
            keys.append(key)
        return keys

    def lookup(self, model: str, cache_salt: str | None, prompt: Sequence[int]) -> int:
        """Tokens of the leading blocks already cached. Like vLLM, the last prompt token is always
        recomputed (its logits are needed), so a full hit still leaves one block to compute."""
        hits = 0
        for key in self._keys(model, cache_salt, prompt[: max(len(prompt) - 1, 0)]):
            if key not in self._blocks:
                break
            self._blocks.move_to_end(key)
            hits += 1
        return hits * self.block_size

    def insert(self, model: str, cache_salt: str | None, tokens: Sequence[int]) -> None:
        for key in self._keys(model, cache_salt, tokens):
            self._blocks[key] = None
            self._blocks.move_to_end(key)
        while len(self._blocks) > self._capacity:
            self._blocks.popitem(last=False)

    def clear(self) -> None:
        self._blocks.clear()


class TokenChain:
    """An immutable token sequence that shares its prefix with the chain it extends, so a turn
    stores only its own tokens and carries the digest state of everything before it."""

    __slots__ = ("_digest", "count", "digest_hex", "parent", "suffix")

    def __init__(self, parent: TokenChain | None, suffix: Sequence[int]) -> None:
        self.parent = parent
        self.suffix = array("I", suffix)
        self._digest: TokenDigest = parent._digest.copy() if parent else TokenDigest()
        self._digest.extend(self.suffix)
        self.count = self._digest.count
        self.digest_hex = self._digest.hexdigest()

    def extend(self, suffix: Sequence[int]) -> TokenChain:
        return TokenChain(self, suffix)

    def tokens(self) -> array[int]:
        parts = []
        node: TokenChain | None = self
        while node is not None:
            parts.append(node.suffix)
            node = node.parent
        out = array("I")
        for part in reversed(parts):
            out.extend(part)
        return out


@dataclass(eq=False)
class Handle:
    ref: str
    epoch: str
    cache_salt: str | None
    context_hash: str
    fingerprint: str  # the model's fingerprint when the handle's KV was computed
    chain: TokenChain
    # How many of the chain's first ids are also the first ids of the prompt of the turn that registered
    # it: a turn continuing the handle reports only its prompt ids after those (the caller has the rest).
    shared_tokens: int
    system_open: bool  # the prefix ends inside the leading system block
    # The message the prefix ends with, for generation after an empty append (None for a seeded prefix,
    # which holds ids only: it must be followed by at least one message).
    last_message: Message | None
    expires_at: float


class HandleRegistry:
    """Bounded LRU of handles by ref; a handle also expires at a fixed time after creation."""

    def __init__(self, capacity: int, ttl_seconds: float) -> None:
        self.ttl_seconds = ttl_seconds
        self._capacity = capacity
        self._entries: OrderedDict[str, Handle] = OrderedDict()

    def add(
        self,
        *,
        epoch: str,
        cache_salt: str | None,
        context_hash: str,
        fingerprint: str,
        chain: TokenChain,
        shared_tokens: int,
        system_open: bool,
        last_message: Message | None,
        now: float,
    ) -> Handle:
        handle = Handle(
            ref="pc_" + secrets.token_hex(16),
            epoch=epoch,
            cache_salt=cache_salt,
            context_hash=context_hash,
            fingerprint=fingerprint,
            chain=chain,
            shared_tokens=shared_tokens,
            system_open=system_open,
            last_message=last_message,
            expires_at=now + self.ttl_seconds,
        )
        self._entries[handle.ref] = handle
        while len(self._entries) > self._capacity:
            self._entries.popitem(last=False)
        return handle

    def get(self, ref: str) -> Handle | None:
        handle = self._entries.get(ref)
        if handle is not None:
            self._entries.move_to_end(ref)
        return handle

    def remove(self, ref: str) -> bool:
        return self._entries.pop(ref, None) is not None

    def clear(self) -> int:
        count = len(self._entries)
        self._entries.clear()
        return count

    def expire_all(self, now: float) -> int:
        live = [h for h in self._entries.values() if h.expires_at > now]
        for handle in live:
            handle.expires_at = now
        return len(live)

    def live(self, now: float) -> int:
        return sum(1 for h in self._entries.values() if h.expires_at > now)
