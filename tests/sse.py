"""Server-Sent Events as a client reads them off the wire."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import orjson


def sse_events(reply: httpx.Response) -> Iterator[tuple[str, dict[str, Any]]]:
    """(event name, parsed data) per frame; every frame must be LF-only and named after its type."""
    buffer = b""
    for chunk in reply.iter_raw():
        assert b"\r" not in chunk, "SSE frames must use LF line endings"
        buffer += chunk
        while b"\n\n" in buffer:
            frame, buffer = buffer.split(b"\n\n", 1)
            name, data = frame.split(b"\n", 1)
            assert name.startswith(b"event: ") and data.startswith(b"data: ")
            yield name[7:].decode(), orjson.loads(data[6:])
