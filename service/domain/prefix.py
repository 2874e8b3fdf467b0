"""Prefix hashing: the one canonical digest of a token sequence.

Token ids are packed as little-endian uint32 and hashed with xxh3-128; the hex digest is what prefix
records store, what backends report as `prompt_digest`, and what tests compare. Every party must use
this function so that a digest means the same thing everywhere.
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Iterable

import xxhash

_LITTLE_ENDIAN = sys.byteorder == "little"


def pack_tokens(token_ids: Iterable[int]) -> bytes:
    """Little-endian uint32 packing, independent of the host's byte order."""
    packed = array("I", token_ids)
    if packed.itemsize != 4:  # pragma: no cover - every supported platform has 4-byte unsigned int
        raise RuntimeError("array('I') is not 32-bit on this platform")
    if not _LITTLE_ENDIAN:  # pragma: no cover
        packed.byteswap()
    return packed.tobytes()


def token_digest(token_ids: Iterable[int]) -> str:
    """xxh3-128 hex digest of a token sequence."""
    return xxhash.xxh3_128_hexdigest(pack_tokens(token_ids))


class TokenDigest:
    """Incremental form of `token_digest`: extend(a); extend(b) equals token_digest(a + b)."""

    __slots__ = ("_hasher", "count")

    def __init__(self) -> None:
        self._hasher = xxhash.xxh3_128()
        self.count = 0

    def extend(self, token_ids: Iterable[int]) -> None:
        packed = pack_tokens(token_ids)
        self._hasher.update(packed)
        self.count += len(packed) // 4

    def copy(self) -> TokenDigest:
        clone = TokenDigest.__new__(TokenDigest)
        clone._hasher = self._hasher.copy()
        clone.count = self.count
        return clone

    def hexdigest(self) -> str:
        return self._hasher.hexdigest()
