"""The real vLLM the `vllm` tests run against (with the convstate-vllm plugin), and the service in front
of it.

`make test-vllm` (tests/vllm/lane.sh) starts vLLM and names it in CONVSTATE_TEST_VLLM_URL,
CONVSTATE_TEST_VLLM_API_KEY and CONVSTATE_TEST_VLLM_MODEL, and how to restart it in
CONVSTATE_TEST_VLLM_RESTART. Without a vLLM answering there these tests fail; they never skip."""

from __future__ import annotations

import os
import shlex
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from service.backends.client import BackendClient
from service.config import Settings
from service.domain.fingerprint import SAMPLING_FIELDS
from service.domain.items import history_messages
from service.serving import ServerThread
from service.store.conversations import ConversationStore
from service.store.models import Response
from service.store.responses import ResponseStore
from tests.conftest import Service, start_service
from tests.vllm.recorder import Exchange, Recorder

RESTART = "restart_vllm"
# The tool the lane's tool-calling turns offer (Responses form).
WEATHER: Any = {
    "type": "function",
    "name": "get_weather",
    "description": "The current weather in a city.",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
        "additionalProperties": False,
    },
    "strict": True,
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that restart vLLM run last: every other test keeps its handles."""
    items.sort(key=lambda item: RESTART in getattr(item, "fixturenames", ()))


@dataclass(frozen=True)
class Vllm:
    url: str
    api_key: str
    model: str

    def http(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.url, headers={"authorization": f"Bearer {self.api_key}"}, timeout=120
        )


@pytest.fixture(scope="session")
def vllm() -> Vllm:
    names = ("CONVSTATE_TEST_VLLM_URL", "CONVSTATE_TEST_VLLM_API_KEY", "CONVSTATE_TEST_VLLM_MODEL")
    missing = [name for name in names if not os.environ.get(name)]
    if missing:
        pytest.fail(f"the vllm tests need a running vLLM ({', '.join(missing)} unset): run `make test-vllm`")
    server = Vllm(*(os.environ[name] for name in names))
    try:
        with server.http() as http:
            cards = http.get("/v1/models").raise_for_status().json()["data"]
    except httpx.HTTPError as exc:
        pytest.fail(f"vLLM at {server.url} does not answer /v1/models: {exc!r}")
    served = {card["id"]: card for card in cards}
    if server.model not in served:
        pytest.fail(f"vLLM at {server.url} does not serve {server.model}")
    if "prompt_cache" not in served[server.model]:
        pytest.fail(f"vLLM at {server.url} runs without the convstate plugin (VLLM_PLUGINS=convstate)")
    return server


@pytest.fixture(scope="session")
def restart_vllm(vllm: Vllm) -> Callable[[], None]:
    """Stop the lane's vLLM and start it again on the same address (a new epoch); minutes on 2 cores."""
    command = os.environ.get("CONVSTATE_TEST_VLLM_RESTART")
    if not command:
        pytest.fail("CONVSTATE_TEST_VLLM_RESTART is unset: run `make test-vllm`")

    def restart() -> None:
        subprocess.run(shlex.split(command), check=True, timeout=1200)

    return restart


@pytest.fixture(scope="session")
def recorder(vllm: Vllm) -> Iterator[Recorder]:
    """The proxy every service below talks to vLLM through."""
    recording = Recorder(vllm.url)
    with ServerThread(recording.app()) as server:
        recording.url = server.url
        yield recording


@pytest.fixture(autouse=True)
def every_turn_renders_as_generated(vllm: Vllm, recorder: Recorder) -> Iterator[None]:
    """After each test, every chat completion it caused that vLLM answered: the /tokenize chat form of
    the body the service sent equals the prompt token ids vLLM generated from."""
    first = len(recorder.exchanges)
    yield
    with vllm.http() as http:
        for exchange in recorder.exchanges[first:]:
            # A continued (or seeded) turn's body holds only its new messages: its tests render the
            # stored history.
            if exchange.status != 200 or exchange.prompt_token_ids is None or _continued(exchange):
                continue
            body = {
                key: value
                for key, value in exchange.body.items()
                if key != "prompt_cache" and key not in SAMPLING_FIELDS
            }
            rendered = http.post("/tokenize", json=body).raise_for_status().json()["tokens"]
            assert rendered == exchange.prompt_token_ids, f"render differs from generation: {exchange.body}"


def _continued(exchange: Exchange) -> bool:
    cache = exchange.body.get("prompt_cache") or {}
    return bool(cache.get("ref") or cache.get("seed"))


@pytest.fixture(scope="session")
def vllm_service(vllm: Vllm, recorder: Recorder, migrated_urls: dict[str, str]) -> Iterator[Any]:
    """Factory: the service in a backend mode against vLLM (through the recorder), one per settings."""
    running: dict[tuple[object, ...], Service] = {}

    def get(mode: str = "full", **overrides: object) -> Service:
        settings: dict[str, object] = {"backend_mode": mode, "backend_api_key": vllm.api_key, **overrides}
        key = tuple(sorted(settings.items()))
        if key not in running:
            running[key] = start_service(migrated_urls["postgres"], recorder.url, **settings)
        return running[key]

    yield get
    for service in running.values():
        service.server.stop()


async def canary_render(
    engine: AsyncEngine,
    settings: Settings,
    exchange: Exchange,
    response_id: str,
    instructions: str | None,
    *,
    through_reply: bool,
    conversation_id: str | None = None,
) -> list[int]:
    """A stored turn's history rendered as the canary renders it (TurnPlan.render_body: the body the turn
    was sent with, less the cache reference and sampling, over the stored history) through vLLM's
    /tokenize chat form: through the turn's reply without a generation prompt (what the canary checks a
    handle against), or up to its reply with one (what the turn was generated from). A conversation's
    turn must be its latest."""
    async with engine.connect() as conn:
        tenant = (await conn.execute(select(Response.tenant).where(Response.id == response_id))).scalar_one()
    if conversation_id is None:
        segments = await ResponseStore(engine).history(tenant, response_id)
    else:
        segments = await ConversationStore(engine).history(tenant, conversation_id)
    if not through_reply and segments and segments[-1][0]:
        segments = segments[:-1]
    body = {
        key: value
        for key, value in exchange.body.items()
        if key not in ("messages", "prompt_cache") and key not in SAMPLING_FIELDS
    }
    body.update(messages=history_messages(instructions, segments), add_generation_prompt=not through_reply)
    client = BackendClient(settings)
    try:
        return await client.tokenize_chat(body)
    finally:
        await client.aclose()
