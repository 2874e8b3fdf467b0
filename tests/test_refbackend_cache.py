"""The prompt_cache extension over real HTTP: a continued prompt is exactly the full render, every
typed miss, and the fault injection the service's fallback tests rely on."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from service.backends.reference.config import ReferenceSettings
from service.backends.reference.server import create_app
from service.domain.prefix import token_digest
from service.serving import ServerThread

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]


@pytest.fixture(scope="module")
def client() -> Iterator[httpx.Client]:
    with (
        ServerThread(create_app(ReferenceSettings(handle_ttl_seconds=60))) as server,
        httpx.Client(base_url=server.url, timeout=30) as http,
    ):
        yield http


def fingerprint(client: httpx.Client, model: str) -> str:
    cards = client.get("/v1/models").json()["data"]
    return str(next(c for c in cards if c["id"] == model)["prompt_cache"]["fingerprint"])


def reply_message(data: dict[str, Any]) -> dict[str, Any]:
    """The assistant message as a caller stores it and sends it back in the history."""
    message = data["choices"][0]["message"]
    out: dict[str, Any] = {"role": "assistant", "content": message["content"]}
    if message["reasoning"]:
        out["reasoning"] = message["reasoning"]
    if message["tool_calls"]:
        out["tool_calls"] = message["tool_calls"]
    return out


class Conversation:
    """Drives one conversation on the cache path and checks every turn against a full render."""

    def __init__(self, client: httpx.Client, model: str, **settings: Any) -> None:
        self.client, self.model, self.settings = client, model, settings
        self.history: list[dict[str, Any]] = []
        self.handle: dict[str, Any] | None = None
        self.covered = 0  # history messages the handle covers
        self.prompt_ids: list[int] = []  # of the turn that registered the handle

    def prompt_cache(self, **overrides: Any) -> dict[str, Any]:
        assert self.handle is not None
        return {
            "ref": self.handle["ref"],
            "tokens": self.handle["safe_tokens"],
            "prefix_hash": self.handle["prefix_hash"],
            "fingerprint": self.handle["fingerprint"],
            "register": True,
            **overrides,
        }

    def send(self, new: list[dict[str, Any]], **extra: Any) -> httpx.Response:
        messages = self.history[self.covered :] + new
        body: dict[str, Any] = {"model": self.model, "messages": messages, **self.settings, **extra}
        body.setdefault("prompt_cache", self.prompt_cache() if self.handle else {"register": True})
        return self.client.post("/v1/chat/completions", json=body)

    def turn(self, new: list[dict[str, Any]]) -> dict[str, Any]:
        reply = self.send(new, return_token_ids=True)
        assert reply.status_code == 200, reply.text
        data: dict[str, Any] = reply.json()
        self.history += new
        handle = data["prompt_cache"]
        assert handle["reused_tokens"] == (self.handle["safe_tokens"] if self.handle else 0)
        full_body = {"model": self.model, "messages": self.history, **self.settings}
        rendered = self.client.post("/tokenize", json=full_body).json()
        assert data["prompt_digest"] == rendered["prompt_digest"]
        # After a ref only the ids past the registering prompt's body are reported (at most its
        # 3-token generation prompt before the new part): the reply does not grow with the history.
        start = data.get("prompt_token_ids_start", 0)
        assert (start == 0) is (self.handle is None)
        assert start >= len(self.prompt_ids) - 3
        self.prompt_ids = [*self.prompt_ids[:start], *data["prompt_token_ids"]]
        assert self.prompt_ids == rendered["tokens"]
        assert data["usage"]["prompt_tokens"] == rendered["count"]
        full = self.client.post("/v1/chat/completions", json=full_body).json()
        assert full["choices"][0]["message"] == data["choices"][0]["message"]
        self.history.append(reply_message(data))
        self.check_handle(handle, rendered["count"])
        self.handle = handle
        self.covered = len(self.history) if handle["covers_output"] else len(self.history) - 1
        return data

    def check_handle(self, handle: dict[str, Any], prompt_tokens: int) -> None:
        """`tokens` is the next render's view of this turn; the handle covers `safe_tokens` of it."""
        after = {
            "model": self.model,
            "messages": self.history,
            "add_generation_prompt": False,
            **self.settings,
        }
        turn_tokens = self.client.post("/tokenize", json=after).json()["tokens"]
        assert handle["tokens"] == len(turn_tokens)
        before = {**after, "messages": self.history[:-1]}
        covered = (
            turn_tokens
            if handle["covers_output"]
            else self.client.post("/tokenize", json=before).json()["tokens"]
        )
        assert handle["safe_tokens"] == len(covered) and handle["safe_boundary"] == handle["covers_output"]
        assert handle["safe_tokens"] <= prompt_tokens - 3 or handle["covers_output"]
        assert handle["prefix_hash"] == token_digest(covered)


USER_TURNS: list[list[dict[str, Any]]] = [
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello!"}],
    [{"role": "user", "content": "What does get_weather say for Paris?"}],
    [],  # filled with the tool result for the call the backend made
    [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Thanks."},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
            ],
        }
    ],
    [{"role": "user", "content": "Once more, briefly."}],
]


@pytest.mark.parametrize("model", ["ref-chatml", "ref-reasoning-trim", "ref-system-once"])
@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"reasoning_effort": "high"},
        {"cache_salt": "tenant-1", "chat_template_kwargs": {"enable_thinking": True}},
    ],
)
def test_continuation_is_the_full_render(client: httpx.Client, model: str, settings: dict[str, Any]) -> None:
    conv = Conversation(client, model, tools=TOOLS, **settings)
    for new in USER_TURNS:
        if not new:
            call = conv.history[-1]["tool_calls"][0]
            new = [{"role": "tool", "tool_call_id": call["id"], "content": '{"sky":"clear","c":21}'}]
        data = conv.turn(new)
        assert conv.handle is not None
        thinking = bool(settings)
        trimmed = model == "ref-reasoning-trim" and thinking
        assert conv.handle["covers_output"] is not trimmed
        assert (
            data["usage"]["prompt_tokens_details"]["cached_tokens"] > 0 or conv.handle["reused_tokens"] == 0
        )
    assert any(m.get("tool_calls") for m in conv.history)


def test_empty_append_and_in_place_system_message(client: httpx.Client) -> None:
    conv = Conversation(client, "ref-chatml")
    conv.turn([{"role": "user", "content": "hi"}])
    conv.turn([])  # regenerate: only the generation prompt is new
    conv.turn([{"role": "developer", "content": "New rule."}, {"role": "user", "content": "ok"}])


def test_reasoning_trim_turn_without_reasoning_is_safe(client: httpx.Client) -> None:
    conv = Conversation(client, "ref-reasoning-trim")
    conv.turn([{"role": "user", "content": "hi"}])
    assert conv.handle is not None and conv.handle["covers_output"]


def miss(reply: httpx.Response, code: str) -> None:
    assert reply.status_code == 409, reply.text
    assert reply.json() == {
        "error": {
            "message": reply.json()["error"]["message"],
            "type": "prompt_cache_miss",
            "param": "prompt_cache",
            "code": code,
        }
    }


def started(client: httpx.Client, model: str = "ref-chatml", **settings: Any) -> Conversation:
    conv = Conversation(client, model, **settings)
    conv.turn([{"role": "system", "content": "S"}, {"role": "user", "content": "first"}])
    return conv


NEXT = [{"role": "user", "content": "next"}]


def test_unknown_ref(client: httpx.Client) -> None:
    conv = started(client, cache_salt="a")
    miss(conv.send(NEXT, prompt_cache=conv.prompt_cache(ref="pc_" + "0" * 32)), "unknown_ref")
    miss(conv.send(NEXT, cache_salt="b"), "unknown_ref")
    assert conv.send(NEXT).status_code == 200


def test_expired_then_unknown(client: httpx.Client) -> None:
    conv = started(client)
    assert client.post("/admin/expire").json()["expired"] >= 1
    miss(conv.send(NEXT), "expired")
    miss(conv.send(NEXT), "unknown_ref")


def test_expiry_by_ttl() -> None:
    with (
        ServerThread(create_app(ReferenceSettings(handle_ttl_seconds=0.3))) as server,
        httpx.Client(base_url=server.url) as http,
    ):
        conv = started(http)
        assert conv.handle is not None and conv.handle["expires_at"] <= time.time() + 0.3
        time.sleep(0.35)
        miss(conv.send(NEXT), "expired")


def test_fingerprint_mismatch(client: httpx.Client) -> None:
    conv = started(client)
    miss(
        conv.send(NEXT, prompt_cache=conv.prompt_cache(fingerprint=fingerprint(client, "ref-system-once"))),
        "fingerprint_mismatch",
    )
    miss(conv.send(NEXT, model="ref-system-once", prompt_cache=conv.prompt_cache()), "fingerprint_mismatch")


def test_prefix_mismatch(client: httpx.Client) -> None:
    conv = started(client)
    assert conv.handle is not None
    miss(
        conv.send(NEXT, prompt_cache=conv.prompt_cache(tokens=conv.handle["safe_tokens"] - 1)),
        "prefix_mismatch",
    )
    miss(conv.send(NEXT, prompt_cache=conv.prompt_cache(prefix_hash="0" * 32)), "prefix_mismatch")
    miss(conv.send(NEXT, tools=TOOLS), "prefix_mismatch")
    miss(conv.send(NEXT, reasoning_effort="low"), "prefix_mismatch")
    miss(conv.send(NEXT, chat_template_kwargs={"x": 1}), "prefix_mismatch")
    assert conv.send(NEXT).status_code == 200


def test_not_appendable(client: httpx.Client) -> None:
    once = started(client, "ref-system-once")
    miss(once.send([{"role": "system", "content": "late"}, *NEXT]), "not_appendable")
    miss(once.send([*NEXT, {"role": "developer", "content": "late"}]), "not_appendable")
    # A handle that ends inside the leading system block (a trimmed turn after only a system
    # message) cannot take a system message: a full render would merge it into that block.
    open_block = Conversation(client, "ref-reasoning-trim", reasoning_effort="high")
    open_block.turn([{"role": "system", "content": "S"}])
    assert open_block.handle is not None and not open_block.handle["covers_output"]
    body = {
        "model": "ref-reasoning-trim",
        "reasoning_effort": "high",
        "prompt_cache": open_block.prompt_cache(),
    }
    late_system = [{"role": "system", "content": "T"}, *NEXT]
    miss(client.post("/v1/chat/completions", json={**body, "messages": late_system}), "not_appendable")
    assert client.post("/v1/chat/completions", json={**body, "messages": NEXT}).status_code == 200


def test_misses_are_checked_in_protocol_order(client: httpx.Client) -> None:
    conv = started(client)
    wrong = conv.prompt_cache(fingerprint="f" * 32, tokens=1)
    miss(conv.send(NEXT, prompt_cache=wrong), "fingerprint_mismatch")
    client.post("/admin/expire")
    miss(conv.send(NEXT, prompt_cache=wrong), "expired")


def test_stats_count_hits_misses_and_rendered_tokens(client: httpx.Client) -> None:
    conv = started(client)
    client.post("/stats/reset")
    data = conv.send([{"role": "user", "content": "short"}]).json()
    miss(conv.send(NEXT, prompt_cache=conv.prompt_cache(prefix_hash="0" * 32)), "prefix_mismatch")
    stats = client.get("/stats").json()
    assert stats["hits"] == 1 and stats["misses"] == {"prefix_mismatch": 1} and stats["full_renders"] == 0
    assert stats["prompt_tokens"] == data["usage"]["prompt_tokens"]
    reply_tokens = data["prompt_cache"]["tokens"] - (data["usage"]["prompt_tokens"] - 3)
    new_tokens = data["usage"]["prompt_tokens"] - data["prompt_cache"]["reused_tokens"]
    assert stats["tokens_rendered"] == new_tokens + reply_tokens


def test_restart_drops_handles_and_prefix_blocks(client: httpx.Client) -> None:
    conv = started(client)
    before = client.get("/stats").json()
    epoch = client.post("/admin/restart").json()["epoch"]
    assert (
        epoch != before["epoch"]
        and client.get("/v1/models").json()["data"][0]["prompt_cache"]["epoch"] == epoch
    )
    miss(conv.send(NEXT), "unknown_ref")
    after = client.get("/stats").json()
    assert (
        after["handles"] == 0
        and after["requests"] == before["requests"] + 1
        and after["restarts"] == before["restarts"] + 1
    )
    full = client.post("/v1/chat/completions", json={"model": "ref-chatml", "messages": conv.history}).json()
    assert full["usage"]["prompt_tokens_details"]["cached_tokens"] == 0


def test_evict_one_and_all(client: httpx.Client) -> None:
    first, second = started(client), started(client)
    assert first.handle is not None
    assert client.post("/admin/evict", json={"ref": first.handle["ref"]}).json() == {"evicted": 1}
    miss(first.send(NEXT), "unknown_ref")
    assert second.send(NEXT).status_code == 200
    assert client.post("/admin/evict", json={}).json()["evicted"] >= 1
    miss(second.send(NEXT), "unknown_ref")
    assert client.get("/stats").json()["handles"] == 0


def test_handle_registry_is_bounded() -> None:
    with (
        ServerThread(create_app(ReferenceSettings(max_handles=2))) as server,
        httpx.Client(base_url=server.url) as http,
    ):
        oldest, *_ = [started(http) for _ in range(3)]
        miss(oldest.send(NEXT), "unknown_ref")
        assert http.get("/stats").json()["handles"] == 2


def test_injected_failures(client: httpx.Client) -> None:
    body = {"model": "ref-chatml", "messages": NEXT}
    assert client.post("/admin/fail", json={"count": 2, "status": 503}).json() == {"count": 2, "status": 503}
    for path in ("/v1/chat/completions", "/tokenize"):
        reply = client.post(path, json=body)
        assert reply.status_code == 503
        assert (
            reply.json()["error"]["type"] == "ServiceUnavailableError"
            and reply.json()["error"]["code"] == 503
        )
    assert client.post("/v1/chat/completions", json=body).status_code == 200
    client.post("/admin/fail", json={"count": 1, "status": 500})
    assert client.post("/v1/chat/completions", json=body).json()["error"]["type"] == "InternalServerError"
    assert client.post("/admin/fail", json={"count": -1}).status_code == 400


def test_injected_latency(client: httpx.Client) -> None:
    client.post("/admin/latency", json={"ms": 150})
    try:
        start = time.perf_counter()
        assert client.post("/tokenize", json={"prompt": "hi"}).status_code == 200
        assert time.perf_counter() - start >= 0.15
    finally:
        client.post("/admin/latency", json={"ms": 0})
    start = time.perf_counter()
    client.post("/tokenize", json={"prompt": "hi"})
    assert time.perf_counter() - start < 0.15


def test_malformed_prompt_cache_is_a_bad_request(client: httpx.Client) -> None:
    body = {"model": "ref-chatml", "messages": NEXT, "prompt_cache": {"ref": "pc_x"}}
    assert client.post("/v1/chat/completions", json=body).status_code == 400
    body["prompt_cache"] = {"ref": "pc_x", "tokens": "many", "prefix_hash": "0", "fingerprint": "0"}
    assert client.post("/v1/chat/completions", json=body).status_code == 400


def test_streaming_reply_carries_the_new_handle(client: httpx.Client) -> None:
    conv = started(client)
    payload = {"model": "ref-chatml", "messages": NEXT, "stream": True, "prompt_cache": conv.prompt_cache()}
    with client.stream("POST", "/v1/chat/completions", json=payload) as reply:
        lines = [line for line in reply.iter_lines() if line.startswith("data: {")]
    last = json.loads(lines[-1][6:])
    assert last["choices"][0]["finish_reason"] == "stop"
    assert last["prompt_cache"]["ref"].startswith("pc_") and last["prompt_cache"]["reused_tokens"] > 0
    assert reply.headers["x-prompt-digest"] == last["prompt_digest"]
