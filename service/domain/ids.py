"""Public ids, shaped like OpenAI's (`resp_` + 48 hex) and time-ordered so b-tree inserts stay local.

The first 32 hex digits are a UUIDv7 (48-bit millisecond timestamp, version and variant bits); 16 more
random hex digits follow, so an id carries 138 random bits.
"""

from __future__ import annotations

import os
import time


def new_id(prefix: str) -> str:
    # One read of the system's randomness per id (a turn makes several): 10 bytes for the UUIDv7, 8 more.
    random = os.urandom(18)
    rand = int.from_bytes(random[:10], "big")
    unix_ms = time.time_ns() // 1_000_000
    value = (unix_ms & ((1 << 48) - 1)) << 80
    value |= 0x7 << 76  # version
    value |= ((rand >> 62) & 0xFFF) << 64  # rand_a
    value |= 0b10 << 62  # variant
    value |= rand & ((1 << 62) - 1)  # rand_b
    return f"{prefix}_{value:032x}{random[10:].hex()}"


RESPONSE = "resp"
MESSAGE = "msg"
FUNCTION_CALL = "fc"
FUNCTION_CALL_OUTPUT = "fco"
REASONING = "rs"
CONVERSATION = "conv"
COMPACTION = "cmp"
