"""The correctness oracle: what a full render of a history digests to, asked of the reference backend."""

from __future__ import annotations

from typing import Any

import httpx

from service.domain.prefix import token_digest


def full_render_digest(backend_url: str, model: str, messages: list[dict[str, Any]], **render: Any) -> str:
    body = {"model": model, "messages": messages, "add_generation_prompt": True, **render}
    reply = httpx.post(f"{backend_url}/tokenize", json=body, timeout=30)
    reply.raise_for_status()
    return token_digest(reply.json()["tokens"])
