"""The correctness oracle: what a full render of a history digests to, asked of the reference backend."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import httpx
from sqlalchemy.engine import make_url

from service.domain.prefix import token_digest


def full_render_digest(backend_url: str, model: str, messages: list[dict[str, Any]], **render: Any) -> str:
    body = {"model": model, "messages": messages, "add_generation_prompt": True, **render}
    reply = httpx.post(f"{backend_url}/tokenize", json=body, timeout=30)
    reply.raise_for_status()
    return token_digest(reply.json()["tokens"])


def recorded_digest(database_url: str, response_id: str) -> str | None:
    """The prompt digest the service recorded for a turn (a streamed turn has no digest header)."""

    async def fetch() -> str | None:
        url = make_url(database_url)
        conn = await asyncpg.connect(host=url.host, port=url.port, user=url.username, database=url.database)
        try:
            digest: str | None = await conn.fetchval(
                "SELECT prompt_digest FROM prefix_records WHERE response_id = $1", response_id
            )
            return digest
        finally:
            await conn.close()

    return asyncio.run(fetch())


def assistant_message(output: list[dict[str, Any]]) -> dict[str, Any]:
    """A response's output as the one assistant chat message a full render holds for it."""
    message: dict[str, Any] = {"role": "assistant", "content": None}
    for item in output:
        if item["type"] == "reasoning":
            message["reasoning"] = "".join(part["text"] for part in item["content"])
        elif item["type"] == "message":
            message["content"] = "".join(part["text"] for part in item["content"])
        elif item["type"] == "function_call":
            call = {
                "id": item["call_id"],
                "type": "function",
                "function": {"name": item["name"], "arguments": item["arguments"]},
            }
            message.setdefault("tool_calls", []).append(call)
    return message
