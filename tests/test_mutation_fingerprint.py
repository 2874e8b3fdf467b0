"""Every fingerprint part earns its place: for each part, a short chain changes what that part covers
between two turns, and the differential check (the prompt digest equals a full render, and nothing was
continued from KV computed under another fingerprint, salt or render context) must hold as built and
must fail when that one part is dropped from the hash. The backend trusts every handle, so nothing but
the service's decision stands between the chain and a wrong reuse.

Two parts are not mutated here: `key_format` is folded into every other part's hash (changing it
changes them all, so it is never the only difference), and `request` holds fields no Responses request
can set today (test_fingerprint checks that such a field would reach it).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from sqlalchemy import update

from service.backends.reference.config import ReferenceSettings
from service.backends.reference.server import create_app as create_reference_app
from service.domain import fingerprint, plan
from service.domain.fingerprint import PARTS, part_hash
from service.serving import ServerThread
from service.store.db import create_engine, dispose
from service.store.models import Tenant
from tests.conftest import MediaServer, Service, start_service
from tests.oracle import assistant_message, full_render_digest

MODEL = "ref-chatml"
MUTATED = [part for part in PARTS if part not in ("key_format", "request")]
_versions = itertools.count(1)


@dataclass
class Chain:
    """A previous_response_id chain, with the oracle's own copy of its history as chat messages."""

    service: Service
    backend: httpx.Client
    media: MediaServer
    history: list[dict[str, Any]] = field(default_factory=list)
    previous: str | None = None
    wrong: list[str] = field(default_factory=list)

    def turn(
        self,
        content: Any = "Hello.",
        *,
        chat_content: Any = None,
        request: dict[str, Any] | None = None,
        render: dict[str, Any] | None = None,
    ) -> None:
        """Send one turn (`request`: more Responses fields) and check it against a full render (`render`:
        the same settings as chat-completions render fields)."""
        request, render = request or {}, render or {}
        body = {"model": MODEL, "input": [{"role": "user", "content": content}], "max_output_tokens": 16}
        if self.previous:
            body["previous_response_id"] = self.previous
        stale = self.backend.get("/stats").json()["stale_reuses"]
        with self.service.http() as http:
            reply = http.post("/v1/responses", json={**body, **request})
        assert reply.status_code == 200, reply.text
        self.history.append({"role": "user", "content": content if chat_content is None else chat_content})
        instructions = request.get("instructions")
        messages = ([{"role": "system", "content": instructions}] if instructions else []) + self.history
        decision = reply.headers["x-convstate-decision"]
        expected = full_render_digest(str(self.backend.base_url), MODEL, messages, **render)
        if reply.headers["x-convstate-prompt-digest"] != expected:
            self.wrong.append(f"{decision}: the prompt differs from the full render")
        if self.backend.get("/stats").json()["stale_reuses"] != stale:
            self.wrong.append(f"{decision}: continued from stale KV")
        self.history.append(assistant_message(reply.json()["output"]))
        self.previous = reply.json()["id"]


def _reload(part: str) -> Callable[[Chain], None]:
    """The backend swaps what the model runs under in place (same epoch, handles kept)."""

    def scenario(chain: Chain) -> None:
        chain.turn()
        version = next(_versions)
        value: Any = 16 + version if part == "block_size" else f"{part}-v{version}"
        key = "revision" if part == "model" else part
        chain.backend.post("/admin/reload", json={"model": MODEL, "parts": {key: value}}).raise_for_status()
        chain.turn("After the reload.")

    return scenario


def _salt_rotated(chain: Chain) -> None:
    async def rotate() -> None:
        engine = create_engine(chain.service.settings.database_url)
        try:
            async with engine.begin() as conn:
                await conn.execute(update(Tenant).values(cache_salt=f"rotated-{next(_versions)}"))
        finally:
            await dispose(engine)

    chain.turn()
    asyncio.run(rotate())
    chain.service.app.state.pipeline.tenants.forget(chain.service.tenant)
    chain.turn("After the salt rotation.")


def _instructions_changed(chain: Chain) -> None:
    chain.turn(request={"instructions": "Be brief."})
    chain.turn(request={"instructions": "Be thorough."})


def _schema_reordered(chain: Chain) -> None:
    for properties in (
        {"a": {"type": "string"}, "b": {"type": "integer"}},
        {"b": {"type": "integer"}, "a": {"type": "string"}},
    ):
        parameters = {"type": "object", "properties": properties}
        chain.turn(
            request={"tools": [{"type": "function", "name": "f", "parameters": parameters}]},
            render={"tools": [{"type": "function", "function": {"name": "f", "parameters": parameters}}]},
        )


def _effort_changed(chain: Chain) -> None:
    for effort in ("low", "high"):
        chain.turn(request={"reasoning": {"effort": effort}}, render={"reasoning_effort": effort})


def _format_changed(chain: Chain) -> None:
    chain.turn()
    chain.turn(
        request={"text": {"format": {"type": "json_object"}}},
        render={"response_format": {"type": "json_object"}},
    )


def _image_changed(chain: Chain) -> None:
    url = chain.media.put(f"mutation-{next(_versions)}.png", b"before")
    chain.turn(
        [{"type": "input_text", "text": "Look."}, {"type": "input_image", "image_url": url}],
        chat_content=[{"type": "text", "text": "Look."}, {"type": "image_url", "image_url": {"url": url}}],
    )
    chain.media.put(url.rsplit("/", 1)[1], b"after")
    chain.turn("And now?")


SCENARIOS: dict[str, Callable[[Chain], None]] = {
    **{
        part: _reload(part)
        for part in ("model", "tokenizer", "renderer", "chat_template", "lora", "block_size")
    },
    "cache_salt": _salt_rotated,
    "instructions": _instructions_changed,
    "tools": _schema_reordered,
    "reasoning": _effort_changed,
    "response_format": _format_changed,
    "media": _image_changed,
}


def test_every_mutated_part_has_a_scenario() -> None:
    assert sorted(SCENARIOS) == sorted(MUTATED)


@pytest.fixture
def isolated_backend() -> Iterator[ServerThread]:
    """A trusting backend of the test's own: reloads change its fingerprints for good."""
    with ServerThread(create_reference_app(ReferenceSettings(verify_handles=False))) as server:
        yield server


def _masking(part: str) -> Callable[..., dict[str, str | None]]:
    """turn_parts with `part` dropped from the hash: the same constant whatever the turn sends."""
    real = fingerprint.turn_parts

    def masked(*args: Any, **kwargs: Any) -> dict[str, str | None]:
        return {**real(*args, **kwargs), part: part_hash(part, "masked")}

    return masked


@pytest.mark.parametrize("part", MUTATED)
def test_dropping_a_part_from_the_hash_makes_the_differential_check_fail(
    part: str,
    migrated_urls: dict[str, str],
    isolated_backend: ServerThread,
    media_server: MediaServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    service = start_service(
        migrated_urls["postgres"], isolated_backend.url, backend_mode="cache_ref", backend_info_ttl=0.001
    )
    try:
        with httpx.Client(base_url=isolated_backend.url) as backend:
            built = Chain(service, backend, media_server)
            SCENARIOS[part](built)
            assert built.wrong == [], f"as built, the {part} scenario went wrong: {built.wrong}"
            monkeypatch.setattr(plan, "turn_parts", _masking(part))
            mutant = Chain(service, backend, media_server)
            SCENARIOS[part](mutant)
            assert mutant.wrong, f"without the {part} part, the {part} scenario still rendered correctly"
    finally:
        service.server.stop()
