"""The reference backend's vLLM-compatible surface, over real HTTP."""

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

MODEL = "ref-chatml"
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string"},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                    "days": {"type": "integer"},
                    "exact": {"type": "boolean"},
                },
                "required": ["city", "unit", "days", "exact"],
            },
        },
    },
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}},
]
HISTORY = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="module")
def client() -> Iterator[httpx.Client]:
    settings = ReferenceSettings(max_model_len=2048, stream_chunk_tokens=3)
    with ServerThread(create_app(settings)) as server, httpx.Client(base_url=server.url, timeout=30) as http:
        yield http


def chat(client: httpx.Client, **body: Any) -> dict[str, Any]:
    reply = client.post("/v1/chat/completions", json={"model": MODEL, "messages": HISTORY, **body})
    assert reply.status_code == 200, reply.text
    data: dict[str, Any] = reply.json()
    assert reply.headers["x-prompt-digest"] == data["prompt_digest"]
    return data


def stream(client: httpx.Client, **body: Any) -> list[dict[str, Any]]:
    payload = {"model": MODEL, "messages": HISTORY, "stream": True, **body}
    with client.stream("POST", "/v1/chat/completions", json=payload) as reply:
        assert reply.status_code == 200
        assert reply.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in reply.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line[6:]) for line in lines[:-1]]


def error(reply: httpx.Response, status: int) -> dict[str, Any]:
    assert reply.status_code == status, reply.text
    err: dict[str, Any] = reply.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


def test_health_and_models(client: httpx.Client) -> None:
    assert client.get("/health").status_code == 200
    cards = client.get("/v1/models").json()
    assert cards["object"] == "list"
    by_id = {card["id"]: card for card in cards["data"]}
    assert set(by_id) == {"ref-chatml", "ref-reasoning-trim", "ref-system-once"}
    card = by_id[MODEL]
    assert card["object"] == "model" and card["max_model_len"] == 2048 and card["owned_by"] == "vllm"
    ext = card["prompt_cache"]
    assert ext["profile"] == "chatml" and ext["handle_ttl_seconds"] == 600
    parts = ext["fingerprint_parts"]
    assert set(parts) == {"model", "revision", "tokenizer", "renderer", "chat_template", "lora", "block_size"}
    assert parts["renderer"] == "convstate-ref/1" and parts["lora"] is None and parts["block_size"] == 16
    assert len({c["prompt_cache"]["fingerprint"] for c in cards["data"]}) == 3
    assert len({c["prompt_cache"]["fingerprint_parts"]["chat_template"] for c in cards["data"]}) == 3


def test_chat_completion_shape_and_determinism(client: httpx.Client) -> None:
    data = chat(client, return_token_ids=True, max_tokens=200)
    assert data["object"] == "chat.completion" and data["id"].startswith("chatcmpl-")
    choice = data["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["index"] == 0
    message = choice["message"]
    assert message["role"] == "assistant" and message["content"].startswith("Answer ")
    assert message["tool_calls"] == [] and message["reasoning_content"] is None
    usage = data["usage"]
    assert usage["prompt_tokens"] == len(data["prompt_token_ids"])
    assert usage["completion_tokens"] == len(choice["token_ids"])
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["completion_tokens_details"] == {"reasoning_tokens": 0}
    assert data["prompt_digest"] == token_digest(data["prompt_token_ids"])
    again = chat(client, return_token_ids=True, max_tokens=200)
    assert (
        again["choices"][0]["message"] == message and again["choices"][0]["token_ids"] == choice["token_ids"]
    )
    assert chat(client, seed=7)["choices"][0]["message"]["content"] != message["content"]
    assert "prompt_cache" not in data
    assert chat(client)["prompt_token_ids"] is None


def test_tokenize_forms_and_detokenize(client: httpx.Client) -> None:
    data = chat(client, return_token_ids=True)
    tok = client.post("/tokenize", json={"model": MODEL, "messages": HISTORY}).json()
    assert tok["tokens"] == data["prompt_token_ids"] and tok["count"] == len(tok["tokens"])
    assert tok["max_model_len"] == 2048 and tok["token_strs"] is None
    bare = client.post(
        "/tokenize", json={"model": MODEL, "messages": HISTORY, "add_generation_prompt": False}
    )
    assert (
        bare.json()["tokens"] == tok["tokens"][: bare.json()["count"]] and bare.json()["count"] < tok["count"]
    )
    text = client.post(
        "/tokenize", json={"model": MODEL, "prompt": "Hello world", "return_token_strs": True}
    ).json()
    assert text["token_strs"] == ["Hello", "Ġworld"]
    back = client.post("/detokenize", json={"model": MODEL, "tokens": tok["tokens"]}).json()
    assert back[
        "prompt"
    ] == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHello there<|im_end|>\n" + (
        "<|im_start|>assistant\n"
    )
    error(client.post("/detokenize", json={"model": MODEL, "tokens": [10**6]}), 400)
    error(client.post("/tokenize", json={"model": MODEL}), 400)


def test_render_endpoint(client: httpx.Client) -> None:
    rendered = client.post(
        "/v1/chat/completions/render",
        json={"model": MODEL, "messages": HISTORY, "cache_salt": "s", "max_tokens": 9, "temperature": 0.5},
    ).json()
    tok = client.post("/tokenize", json={"model": MODEL, "messages": HISTORY}).json()
    assert rendered["token_ids"] == tok["tokens"] and rendered["prompt_digest"] == tok["prompt_digest"]
    assert rendered["model"] == MODEL and rendered["cache_salt"] == "s"
    assert (
        rendered["sampling_params"]["max_tokens"] == 9 and rendered["sampling_params"]["temperature"] == 0.5
    )


def test_errors(client: httpx.Client) -> None:
    err = error(client.post("/v1/chat/completions", json={"model": "nope", "messages": HISTORY}), 404)
    assert err == {
        "message": "The model `nope` does not exist.",
        "type": "NotFoundError",
        "param": "model",
        "code": 404,
    }
    assert error(client.post("/v1/chat/completions", content=b"{nope"), 400)["type"] == "BadRequestError"
    error(client.post("/v1/chat/completions", json={"model": MODEL, "messages": "hi"}), 400)
    error(client.post("/v1/chat/completions", json={"model": MODEL, "messages": []}), 400)
    error(
        client.post("/v1/chat/completions", json={"model": MODEL, "messages": HISTORY, "max_tokens": 0}), 400
    )
    error(
        client.post(
            "/v1/chat/completions", json={"model": MODEL, "messages": HISTORY, "tool_choice": "auto"}
        ),
        400,
    )
    named = {"type": "function", "function": {"name": "missing"}}
    error(
        client.post("/v1/chat/completions", json={"messages": HISTORY, "tools": TOOLS, "tool_choice": named}),
        400,
    )
    bad_image = [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,!"}}]}
    ]
    error(client.post("/v1/chat/completions", json={"model": MODEL, "messages": bad_image}), 400)
    opts = {"model": MODEL, "messages": HISTORY, "stream_options": {"include_usage": True}}
    error(client.post("/v1/chat/completions", json=opts), 400)


def test_context_length(client: httpx.Client) -> None:
    long = [{"role": "user", "content": "word " * 3000}]
    err = error(client.post("/v1/chat/completions", json={"model": MODEL, "messages": long}), 400)
    assert err["message"].startswith(
        "This model's maximum context length is 2048 tokens. However, your request has"
    )
    prompt = chat(client)["usage"]["prompt_tokens"]
    too_many = {"model": MODEL, "messages": HISTORY, "max_tokens": 2048 - prompt + 1}
    err = error(client.post("/v1/chat/completions", json=too_many), 400)
    assert err["message"].startswith("'max_tokens' or 'max_completion_tokens' is too large")
    assert chat(client, max_completion_tokens=2048 - prompt)["choices"][0]["finish_reason"] == "stop"


def test_length_cut(client: httpx.Client) -> None:
    data = chat(client, max_tokens=5, return_token_ids=True)
    assert data["choices"][0]["finish_reason"] == "length"
    assert data["usage"]["completion_tokens"] == 5 == len(data["choices"][0]["token_ids"])


def test_tool_calls(client: httpx.Client) -> None:
    ask = [{"role": "user", "content": "What does get_weather say, and get_time?"}]
    data = chat(client, messages=ask, tools=TOOLS)
    choice = data["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    calls = choice["message"]["tool_calls"]
    assert [c["function"]["name"] for c in calls] == ["get_weather", "get_time"]
    assert calls[0]["function"]["arguments"] == '{"city":"x","days":1,"exact":true,"unit":"celsius"}'
    assert calls[1]["function"]["arguments"] == "{}"
    assert all(c["id"].startswith("call_") and c["type"] == "function" for c in calls)
    single = chat(client, messages=ask, tools=TOOLS, parallel_tool_calls=False)["choices"][0]["message"]
    assert [c["function"]["name"] for c in single["tool_calls"]] == ["get_weather"]
    assert (
        chat(client, messages=ask, tools=TOOLS, tool_choice="none")["choices"][0]["finish_reason"] == "stop"
    )
    plain = [{"role": "user", "content": "hi"}]
    assert chat(client, messages=plain, tools=TOOLS)["choices"][0]["finish_reason"] == "stop"
    forced = chat(client, messages=plain, tools=TOOLS, tool_choice="required")["choices"][0]["message"]
    assert [c["function"]["name"] for c in forced["tool_calls"]] == ["get_weather"]
    named = {"type": "function", "function": {"name": "get_time"}}
    picked = chat(client, messages=plain, tools=TOOLS, tool_choice=named)["choices"][0]["message"]
    assert [c["function"]["name"] for c in picked["tool_calls"]] == ["get_time"]
    result = [
        *ask,
        {"role": "assistant", "tool_calls": calls},
        {"role": "tool", "tool_call_id": calls[0]["id"], "content": "sunny, 21C"},
    ]
    answer = chat(client, messages=result, tools=TOOLS)["choices"][0]
    assert answer["finish_reason"] == "stop" and '"sunny, 21C"' in answer["message"]["content"]


def test_reasoning_and_response_format(client: httpx.Client) -> None:
    data = chat(client, reasoning_effort="high")
    message = data["choices"][0]["message"]
    assert (
        message["reasoning_content"].startswith("Reasoning ")
        and message["reasoning"] == message["reasoning_content"]
    )
    assert data["usage"]["completion_tokens_details"]["reasoning_tokens"] > 2
    thinking = chat(client, chat_template_kwargs={"enable_thinking": True})["choices"][0]["message"]
    assert thinking["reasoning_content"]
    assert chat(client, reasoning_effort="none")["choices"][0]["message"]["reasoning_content"] is None
    as_json = chat(client, response_format={"type": "json_object"})["choices"][0]["message"]["content"]
    assert isinstance(json.loads(as_json), dict)
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    fmt = {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}
    assert json.loads(chat(client, response_format=fmt)["choices"][0]["message"]["content"]) == {"n": 1}


def test_logprobs(client: httpx.Client) -> None:
    data = chat(client, logprobs=True, top_logprobs=1, return_token_ids=True)
    entries = data["choices"][0]["logprobs"]["content"]
    assert len(entries) == data["usage"]["completion_tokens"]
    assert all(
        e["logprob"] <= 0 and e["top_logprobs"] == [{k: e[k] for k in ("token", "logprob", "bytes")}]
        for e in entries
    )
    assert (
        chat(client, logprobs=True, top_logprobs=1)["choices"][0]["logprobs"]
        == data["choices"][0]["logprobs"]
    )


def assemble(chunks: list[dict[str, Any]]) -> dict[str, Any]:
    """Fold streamed deltas back into a message, as an OpenAI client does."""
    content, reasoning = "", ""
    ids: list[int] = []
    calls: dict[int, dict[str, Any]] = {}
    for chunk in chunks:
        for choice in chunk["choices"]:
            delta = choice["delta"]
            content += delta.get("content") or ""
            reasoning += delta.get("reasoning_content") or ""
            ids += choice.get("token_ids") or []
            for call in delta.get("tool_calls", []):
                slot = calls.setdefault(
                    call["index"],
                    {"id": None, "type": "function", "function": {"name": None, "arguments": ""}},
                )
                slot["id"] = call.get("id") or slot["id"]
                slot["function"]["name"] = call.get("function", {}).get("name") or slot["function"]["name"]
                slot["function"]["arguments"] += call.get("function", {}).get("arguments", "")
    return {
        "content": content or None,
        "reasoning_content": reasoning or None,
        "tool_calls": [calls[i] for i in sorted(calls)],
        "token_ids": ids,
    }


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"reasoning_effort": "low"},
        {"max_tokens": 7},
        {"messages": [{"role": "user", "content": "call get_weather and get_time"}], "tools": TOOLS},
        {
            "messages": [
                {"role": "user", "content": "quote", "name": "u"},
                {"role": "assistant", "content": "ok"},
                {"role": "user", "content": "東京 🚀 naïve"},
            ]
        },
    ],
)
def test_stream_matches_non_stream(client: httpx.Client, body: dict[str, Any]) -> None:
    whole = chat(client, return_token_ids=True, **body)
    chunks = stream(client, return_token_ids=True, stream_options={"include_usage": True}, **body)
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[0]["prompt_token_ids"] == whole["prompt_token_ids"]
    usage_chunk, finish_chunk = chunks[-1], chunks[-2]
    assert usage_chunk["choices"] == []
    for usage in (usage_chunk["usage"], whole["usage"]):
        usage.pop("prompt_tokens_details")  # the first call warmed the prefix cache for the second
    assert usage_chunk["usage"] == whole["usage"]
    assert usage_chunk["prompt_digest"] == whole["prompt_digest"]
    assert finish_chunk["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-2])
    message = whole["choices"][0]["message"]
    folded = assemble(chunks)
    assert folded["content"] == message["content"]
    assert folded["reasoning_content"] == message["reasoning_content"]
    assert folded["tool_calls"] == message["tool_calls"]
    assert folded["token_ids"] == whole["choices"][0]["token_ids"]


def test_stream_chunk_size_and_no_usage(client: httpx.Client) -> None:
    chunks = stream(client, return_token_ids=True)
    content_chunks = [c for c in chunks[1:-1] if c["choices"][0]["delta"].get("content")]
    assert content_chunks and all(len(c["choices"][0]["token_ids"]) == 3 for c in content_chunks[:-1])
    last = chunks[-1]
    assert last["choices"][0]["finish_reason"] == "stop" and "usage" not in last
    assert last["prompt_digest"] == chat(client)["prompt_digest"]


def test_prefix_cache_hits_and_salts(client: httpx.Client) -> None:
    messages = [{"role": "user", "content": "A long question about caching " * 20}]
    first = chat(client, messages=messages, cache_salt="tenant-a")
    second = chat(client, messages=messages, cache_salt="tenant-a")
    other = chat(client, messages=messages, cache_salt="tenant-b")
    prompt = first["usage"]["prompt_tokens"]
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == (prompt - 1) // 16 * 16
    assert other["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    # vLLM's created_cache_tokens: the prompt's full blocks this request computed and cached.
    assert first["usage"]["prompt_tokens_details"]["created_cache_tokens"] == prompt // 16 * 16
    assert second["usage"]["prompt_tokens_details"]["created_cache_tokens"] == prompt // 16 * 16 - (
        (prompt - 1) // 16 * 16
    )
    # The reply's own tokens are cached too: the next turn reuses the whole previous turn's blocks.
    follow = [*messages, first["choices"][0]["message"], {"role": "user", "content": "and?"}]
    third = chat(
        client,
        messages=[{k: v for k, v in m.items() if v is not None} for m in follow],
        cache_salt="tenant-a",
    )
    assert third["usage"]["prompt_tokens_details"]["cached_tokens"] > prompt


def test_stats_count_requests_bytes_and_tokens(client: httpx.Client) -> None:
    client.post("/stats/reset")
    body = json.dumps({"model": MODEL, "messages": HISTORY}).encode()
    reply = client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    stats = client.get("/stats").json()
    assert stats["requests"] == 1 and stats["bytes_received"] == len(body)
    assert stats["tokens_rendered"] == stats["prompt_tokens"] == reply.json()["usage"]["prompt_tokens"]
    assert stats["full_renders"] == 1 and stats["hits"] == 0 and stats["misses"] == {}
    assert stats["epoch"] == client.get("/v1/models").json()["data"][0]["prompt_cache"]["epoch"]


def test_prefill_cost_is_simulated() -> None:
    settings = ReferenceSettings(prefill_us_per_token=2000)
    messages = [{"role": "user", "content": "tell me everything about the prefix cache " * 4}]
    with ServerThread(create_app(settings)) as server, httpx.Client(base_url=server.url) as http:
        timings = []
        for _ in range(2):
            start = time.perf_counter()
            usage = http.post("/v1/chat/completions", json={"messages": messages}).json()["usage"]
            timings.append((time.perf_counter() - start, usage))
    (cold, usage), (warm, warm_usage) = timings
    assert cold >= usage["prompt_tokens"] * 0.002
    uncached = warm_usage["prompt_tokens"] - warm_usage["prompt_tokens_details"]["cached_tokens"]
    assert uncached < 16 and warm < cold
