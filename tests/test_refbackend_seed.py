"""prompt_cache.seed over real HTTP: a prompt continued from an earlier turn's token ids is exactly the
full render of the conversation, costs the backend no render of the seeded part, registers a handle the
next turn continues, and every case the template would not keep is a typed miss."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from service.backends.reference.config import ReferenceSettings
from service.backends.reference.server import create_app
from service.serving import ServerThread
from tests.test_refbackend_cache import TOOLS, fingerprint, reply_message


@pytest.fixture(scope="module")
def client() -> Iterator[httpx.Client]:
    with (
        ServerThread(create_app(ReferenceSettings())) as server,
        httpx.Client(base_url=server.url, timeout=30) as http,
    ):
        yield http


def _chat(client: httpx.Client, body: dict[str, Any]) -> httpx.Response:
    return client.post("/v1/chat/completions", json={"return_token_ids": True, "cache_salt": "s", **body})


def _full_digest(client: httpx.Client, body: dict[str, Any], messages: list[dict[str, Any]]) -> str:
    settings = {k: v for k, v in body.items() if k in ("model", "tools", "reasoning_effort")}
    tokens = client.post("/tokenize", json={**settings, "cache_salt": "s", "messages": messages}).json()
    return str(tokens["prompt_digest"])


CASES = [
    ("ref-chatml", {}),
    ("ref-chatml", {"tools": TOOLS}),
    ("ref-chatml", {"reasoning_effort": "high"}),
    ("ref-reasoning-trim", {}),
    ("ref-reasoning-trim", {"reasoning_effort": "high"}),  # not safe: the seed ends before the reply
    ("ref-system-once", {"tools": TOOLS}),
]


@pytest.mark.parametrize(("model", "settings"), CASES)
def test_a_seeded_prompt_is_the_full_render_and_renders_only_the_new_part(
    client: httpx.Client, model: str, settings: dict[str, Any]
) -> None:
    body = {"model": model, **settings}
    long_history = " ".join(f"line {i}: the build passed after the retry" for i in range(60))
    first_messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": long_history}]
    first = _chat(client, {**body, "messages": first_messages, "prompt_cache": {"register": True}}).json()
    handle = first["prompt_cache"]
    history = [*first_messages, reply_message(first)]
    new = [{"role": "user", "content": "what is the weather in Paris?"}]
    # Reply included among the new messages when the handle does not cover it, as after a ref.
    appended = new if handle["covers_output"] else [reply_message(first), *new]
    before = client.get("/stats").json()
    seed = {
        "prompt_token_ids": first["prompt_token_ids"],
        "output_token_ids": first["choices"][0]["token_ids"],
        "covers_output": handle["covers_output"],
    }
    reply = _chat(
        client,
        {
            **body,
            "messages": appended,
            "prompt_cache": {"seed": seed, "fingerprint": fingerprint(client, model), "register": True},
        },
    )
    assert reply.status_code == 200, reply.text
    second = reply.json()
    after = client.get("/stats").json()
    assert second["prompt_digest"] == _full_digest(client, body, [*history, *new])
    assert after["full_renders"] == before["full_renders"]
    assert after["seeds"] == before["seeds"] + 1
    seeded = len(first["prompt_token_ids"]) - (0 if handle["covers_output"] else 3)
    reused = second["prompt_cache"]["reused_tokens"]
    assert reused >= seeded
    # Rendered: the new messages and generation prompt, and the reply re-rendered (with the template's
    # few tokens around it) for the new handle; none of the seeded hundreds.
    new_part = len(second["prompt_token_ids"]) - reused
    rendered = after["tokens_rendered"] - before["tokens_rendered"]
    assert rendered <= new_part + second["usage"]["completion_tokens"] + 5 < seeded
    # The handle registered on the seed continues like any other.
    third_new = [{"role": "user", "content": "and in Rome?"}]
    ref = second["prompt_cache"]
    third_appended = third_new if ref["covers_output"] else [reply_message(second), *third_new]
    third = _chat(
        client,
        {
            **body,
            "messages": third_appended,
            "prompt_cache": {
                "ref": ref["ref"],
                "tokens": ref["safe_tokens"],
                "prefix_hash": ref["prefix_hash"],
                "fingerprint": ref["fingerprint"],
            },
        },
    ).json()
    full = [*history, *new, reply_message(second), *third_new]
    assert third["prompt_digest"] == _full_digest(client, body, full)


def _seed_miss(
    client: httpx.Client, model: str, body: dict[str, Any], seed: dict[str, Any], **pc: Any
) -> str:
    pc = {"seed": seed, "fingerprint": fingerprint(client, model), **pc}
    reply = _chat(
        client, {"model": model, **body, "messages": [{"role": "user", "content": "x"}], "prompt_cache": pc}
    )
    assert reply.status_code == 409, reply.text
    return str(reply.json()["error"]["code"])


def test_seeds_the_template_would_not_keep_are_typed_misses(client: httpx.Client) -> None:
    messages = [{"role": "user", "content": "think about it"}]
    first = _chat(
        client, {"model": "ref-reasoning-trim", "reasoning_effort": "high", "messages": messages}
    ).json()
    prompt, output = first["prompt_token_ids"], first["choices"][0]["token_ids"]
    effort = {"reasoning_effort": "high"}
    # Its reasoning is dropped from history: the ids do not continue into the next render.
    seed = {"prompt_token_ids": prompt, "output_token_ids": output, "covers_output": True}
    assert _seed_miss(client, "ref-reasoning-trim", effort, seed) == "not_appendable"
    # Cut by max_tokens: no end of message, so the template's re-render need not match.
    cut = _chat(client, {"model": "ref-chatml", "messages": messages, "max_tokens": 2}).json()
    seed = {
        "prompt_token_ids": cut["prompt_token_ids"],
        "output_token_ids": cut["choices"][0]["token_ids"],
        "covers_output": True,
    }
    assert _seed_miss(client, "ref-chatml", {}, seed) == "not_appendable"
    # Not a prompt that ends with the generation prompt.
    seed = {"prompt_token_ids": prompt[:-1], "output_token_ids": [], "covers_output": False}
    assert _seed_miss(client, "ref-chatml", {}, seed) == "not_appendable"
    seed = {"prompt_token_ids": prompt, "output_token_ids": output, "covers_output": False}
    assert _seed_miss(client, "ref-chatml", {}, seed, fingerprint="00" * 16) == "fingerprint_mismatch"
    # A seed followed by no message has nothing to generate after.
    reply = _chat(
        client,
        {
            "model": "ref-chatml",
            "messages": [],
            "prompt_cache": {"seed": seed, "fingerprint": fingerprint(client, "ref-chatml")},
        },
    )
    assert reply.status_code == 409 and reply.json()["error"]["code"] == "not_appendable"


def test_malformed_seeds_are_400s(client: httpx.Client) -> None:
    model_fp = fingerprint(client, "ref-chatml")
    for pc in (
        {"seed": {"prompt_token_ids": [1], "output_token_ids": [2]}, "fingerprint": model_fp},
        {
            "seed": {"prompt_token_ids": "1", "output_token_ids": [], "covers_output": True},
            "fingerprint": model_fp,
        },
        {"seed": {"prompt_token_ids": [1], "output_token_ids": [], "covers_output": False}},
        {
            "seed": {"prompt_token_ids": [10**9], "output_token_ids": [], "covers_output": False},
            "fingerprint": model_fp,
        },
    ):
        reply = _chat(
            client,
            {"model": "ref-chatml", "messages": [{"role": "user", "content": "x"}], "prompt_cache": pc},
        )
        assert reply.status_code == 400, pc


def test_the_model_card_advertises_seeds(client: httpx.Client) -> None:
    cards = client.get("/v1/models").json()["data"]
    assert all(card["prompt_cache"]["seed"] is True for card in cards)
