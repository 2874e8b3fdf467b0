"""Handles: what the plugin keeps of a conversation's prefix, and the bounded registry that issues them.

A handle's `Prefix` is a chain: a turn that continues a handle stores only its own messages and tokens
and points at the prefix it extends, so a conversation of N turns keeps its tokens once, not N times.
A prefix keeps the messages (to render the next turn in full), the token ids (to hand to the engine),
and of the rendered text only its length and digest (to check that the next render starts with it).

A chain may start from a seed (token ids an earlier turn was generated from, whose messages the plugin
never saw) instead of the start of the conversation. Its root keeps the seeded ids and, as its text, only
the decoded end of them (`seed_tail`); the texts of the links after it are measured from that tail.
"""

from __future__ import annotations

import secrets
import time
from array import array
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import xxhash

from convstate_vllm.digest import pack_tokens

Message = dict[str, Any]


@dataclass(eq=False)
class Prefix:
    parent: Prefix | None
    messages: tuple[Message, ...]  # this link's own messages
    ids: array[int]  # this link's own token ids
    text_length: int  # of the whole rendered prefix, in characters
    text_digest: str
    seed_tail: str | None = None  # of a seeded chain (set on its root, inherited by its links)
    count: int = field(init=False)
    digest: str = field(init=False)
    _hasher: Any = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.parent is not None:
            self.seed_tail = self.parent.seed_tail
        self._hasher = self.parent._hasher.copy() if self.parent else xxhash.xxh3_128()
        self._hasher.update(pack_tokens(self.ids))
        self.count = (self.parent.count if self.parent else 0) + len(self.ids)
        self.digest = self._hasher.hexdigest()

    def _links(self) -> list[Prefix]:
        links: list[Prefix] = []
        node: Prefix | None = self
        while node is not None:
            links.append(node)
            node = node.parent
        links.reverse()
        return links

    def token_ids(self) -> list[int]:
        ids: array[int] = array("I")
        for link in self._links():
            ids.extend(link.ids)
        return ids.tolist()

    def all_messages(self) -> list[Message]:
        return [message for link in self._links() for message in link.messages]


def extend(
    parent: Prefix | None, messages: Sequence[Message], ids: Sequence[int], text_length: int, text_digest: str
) -> Prefix:
    return Prefix(parent, tuple(messages), array("I", ids), text_length, text_digest)


def seed_root(ids: Sequence[int], tail: str, text_digest: str) -> Prefix:
    """The root of a seeded chain: the seeded ids, whose text is known only by its decoded end."""
    return Prefix(None, (), array("I", ids), len(tail), text_digest, seed_tail=tail)


@dataclass(eq=False)
class Handle:
    ref: str
    model: str
    cache_salt: str | None
    context: str  # digest of everything besides the messages that shapes the render
    fingerprint: str  # the model's fingerprint when the handle was made
    prefix: Prefix
    # How many of the prefix's first ids are also the first ids of the registering turn's prompt: a turn
    # continuing the handle reports only its prompt ids after those (the caller has the rest).
    shared: int
    expires_at: float


class Registry:
    """Handles by ref, at most `capacity` (least recently used first out), each valid `ttl` seconds from
    its registration. A new process starts a new epoch with an empty registry."""

    def __init__(self, capacity: int, ttl: float, clock: Callable[[], float] = time.time) -> None:
        self.capacity = capacity
        self.ttl = ttl
        self.epoch = secrets.token_hex(8)
        self._clock = clock
        self._handles: OrderedDict[str, Handle] = OrderedDict()

    def now(self) -> float:
        return self._clock()

    def add(
        self,
        *,
        model: str,
        cache_salt: str | None,
        context: str,
        fingerprint: str,
        prefix: Prefix,
        shared: int,
    ) -> Handle:
        handle = Handle(
            ref="pc_" + secrets.token_hex(16),
            model=model,
            cache_salt=cache_salt,
            context=context,
            fingerprint=fingerprint,
            prefix=prefix,
            shared=shared,
            expires_at=self._clock() + self.ttl,
        )
        self._handles[handle.ref] = handle
        while len(self._handles) > self.capacity:
            self._handles.popitem(last=False)
        return handle

    def get(self, ref: str) -> Handle | None:
        handle = self._handles.get(ref)
        if handle is not None:
            self._handles.move_to_end(ref)
        return handle

    def remove(self, ref: str) -> None:
        self._handles.pop(ref, None)

    def __len__(self) -> int:
        return len(self._handles)
