"""What the backend client reads from a reply besides the completion: the token ids (`return_token_ids`,
whole or accumulated over a stream), llm-d's session token (header or cookie) and whether the backend
takes seeds; against the reference backend behind the llm-d stand-in, over real HTTP."""

from __future__ import annotations

import base64
from collections.abc import Iterator

import pytest

from service.backends.client import BackendClient, reply_session_token
from service.backends.http import Headers
from service.backends.reference.config import ReferenceSettings
from service.backends.reference.router import create_router
from service.backends.reference.server import create_app
from service.config import Settings
from service.domain.prefix import token_digest
from service.serving import ServerThread

BODY = {
    "model": "ref-chatml",
    "messages": [{"role": "user", "content": "count the build failures"}],
    "return_token_ids": True,
}


@pytest.fixture(scope="module")
def routed() -> Iterator[str]:
    with (
        ServerThread(create_app(ReferenceSettings(stream_chunk_tokens=2))) as replica,
        ServerThread(create_router([("ns/replica-a", replica.url)])) as router,
    ):
        yield router.url


async def test_token_ids_and_the_session_token_whole_and_streamed(routed: str) -> None:
    client = BackendClient(Settings(backend_url=routed))
    try:
        whole = await client.chat(BODY)
        stream = await client.open_chat_stream(BODY)
        async for _ in stream.deltas():
            pass
        streamed = stream.reply()
        assert (await client.model_info("ref-chatml")) is not None
        assert (await client.model_info("ref-chatml")).seeds  # type: ignore[union-attr]
    finally:
        await client.aclose()
    for reply in (whole, streamed):
        assert reply.prompt_token_ids is not None and reply.output_token_ids is not None
        assert token_digest(reply.prompt_token_ids) == reply.prompt_digest
        assert len(reply.output_token_ids) == reply.completion_tokens
        assert reply.session_token is not None
        assert base64.b64decode(reply.session_token) == b"ns/replica-a"
    assert streamed.prompt_token_ids == whole.prompt_token_ids
    assert streamed.output_token_ids == whole.output_token_ids


def test_the_session_token_is_read_from_the_header_or_llm_d_s_cookie() -> None:
    def headers(*pairs: tuple[str, str]) -> Headers:
        return Headers([(name.lower(), value) for name, value in pairs])

    assert reply_session_token(headers(("X-Session-Token", "aGVhZGVy"))) == "aGVhZGVy"
    cookie = "llm-d-session=bnMvcG9kLTE=; Path=/; HttpOnly; SameSite=Lax"
    assert reply_session_token(headers(("set-cookie", "other=1"), ("Set-Cookie", cookie))) == "bnMvcG9kLTE="
    assert reply_session_token(headers(("set-cookie", "other=1"))) is None
