"""Remote media, fetched as vLLM fetches it: an image given by an http(s) URL renders by the bytes the
URL serves at the time of the request, so the same URL can render differently on another turn."""

from __future__ import annotations

import base64
from typing import Any

import httpx

from service.backends.reference.protocol import bad_request

FETCH_TIMEOUT_SECONDS = 5.0
MAX_MEDIA_BYTES = 20 * 1024 * 1024


def _remote_image_parts(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The `image_url` objects of the body's messages whose URL is http(s)."""
    found = []
    for message in body.get("messages") or []:
        content = message.get("content") if isinstance(message, dict) else None
        for part in content if isinstance(content, list) else []:
            image = part.get("image_url") if isinstance(part, dict) else None
            if isinstance(image, dict) and str(image.get("url", "")).startswith(("http://", "https://")):
                found.append(image)
    return found


async def inline_remote_media(body: dict[str, Any]) -> None:
    """Replace every http(s) image URL with a data URL of the bytes it serves now; 400 if one fails."""
    images = _remote_image_parts(body)
    if not images:
        return
    async with httpx.AsyncClient(timeout=FETCH_TIMEOUT_SECONDS) as client:
        for image in images:
            url = image["url"]
            try:
                reply = await client.get(url)
                reply.raise_for_status()
            except httpx.HTTPError as exc:
                raise bad_request(f"Failed to fetch image {url}: {exc}", param="messages") from None
            if len(reply.content) > MAX_MEDIA_BYTES:
                raise bad_request(f"Image {url} is larger than {MAX_MEDIA_BYTES} bytes", param="messages")
            kind = reply.headers.get("content-type", "application/octet-stream").split(";")[0]
            image["url"] = f"data:{kind};base64,{base64.b64encode(reply.content).decode()}"
