"""The digests the protocol exchanges.

`token_digest` must equal convstate's `service.domain.prefix.token_digest` (xxh3-128 of the ids packed
as little-endian uint32); a golden test in convstate's suite holds the two together.
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Iterable

import xxhash


def pack_tokens(token_ids: Iterable[int]) -> bytes:
    packed = array("I", token_ids)
    if sys.byteorder != "little":  # pragma: no cover - every supported platform is little-endian
        packed.byteswap()
    return packed.tobytes()


def token_digest(token_ids: Iterable[int]) -> str:
    return xxhash.xxh3_128_hexdigest(pack_tokens(token_ids))


def text_digest(text: str) -> str:
    """A rendered text's identity: a handle keeps this, not the text."""
    return xxhash.xxh3_128_hexdigest(text.encode("utf-8", "surrogatepass"))
