"""Render + tokenize time and request bytes per turn against depth, on vLLM: the full path (vLLM renders
the whole history) against the cache path (the convstate-vllm plugin continues a handle), in one run.

    bash tests/vllm/lane.sh bench          # measure (in the lane's vLLM environment), then plot

`measure` runs in vLLM's environment with the plugin installed: it builds vLLM's renderer for
SmolLM2-135M-Instruct the way vLLM's API server does (no engine: nothing is generated), and grows one
agent-like conversation (tool-result-like user turns, short replies, a tool call and its result every
fourth turn) to at least --tokens prompt tokens. At each depth, alternately and --repeat times:

- full: what vLLM's chat route does before the engine for the whole history: parse the request body,
  render the chat template, tokenize (`OnlineRenderer.render_chat`);
- cache_ref: the same for the body convstate sends on a hit (the new messages and the handle), through
  the plugin: parse, verify the handle, render the whole conversation as text, tokenize only what is
  new, then vLLM's chat preprocessing with the token ids handed in; and, after the reply, the
  registration of the next handle (one more render, the reply's tokens);
- seed: the same for the body convstate sends when the handle is gone (the new messages and the ids the
  previous turn was generated from and generated, `prompt_cache.seed`), through the plugin: parse,
  render only what follows the seed (after its stand-in histories), tokenize it, then vLLM's chat
  preprocessing. Turns after a tool-call reply are not seeded (with vLLM's tool parser the plugin
  refuses such a seed).

Every cache-path and seeded prompt is checked equal to the full render. `plot` (in convstate's .venv,
which has matplotlib) draws the JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import time
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

NAME = "vllm_render"
RESULTS = Path(__file__).parent / "results"
MODEL = "smollm2-135m-instruct"
SALT = "bench-tenant-salt"
WORDS = [
    "the",
    "lighthouse",
    "keeper",
    "logged",
    "wind",
    "speed",
    "rain",
    "visibility",
    "at",
    "dawn",
    "and",
    "dusk",
    "checked",
    "the",
    "lamp",
    "oil",
    "trimmed",
    "wicks",
    "wrote",
    "letters",
    "to",
    "the",
    "harbour",
    "master",
    "about",
    "ships",
    "seen",
    "passing",
    "north",
    "12",
    "knots",
    "1024",
    "error:",
    "timeout",
    "while",
    "reading",
    "/var/log/app.log",
    "status=503",
    "retry",
    "in",
    "5s",
]


def _text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def _turn(rng: random.Random, turn: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The new messages of a turn and the reply: like an agent's, mostly tool output."""
    new: list[dict[str, Any]] = [{"role": "user", "content": f"Step {turn}. " + _text(rng, 260)}]
    reply: dict[str, Any] = {"role": "assistant", "content": _text(rng, 45)}
    if turn % 4 == 3:
        call = {
            "id": f"call_{turn}",
            "type": "function",
            "function": {
                "name": "read_log",
                "arguments": json.dumps({"path": "/var/log/app.log", "lines": 50}),
            },
        }
        reply = {"role": "assistant", "content": None, "tool_calls": [call]}
    return new, reply


async def _timed(repeat: int, work: Callable[[], Awaitable[Any]]) -> tuple[float, float, Any]:
    """(median wall ms, median process CPU ms, last result) of `repeat` runs."""
    walls, cpus, result = [], [], None
    for _ in range(repeat):
        wall, cpu = time.perf_counter(), time.process_time()
        result = await work()
        walls.append((time.perf_counter() - wall) * 1000)
        cpus.append((time.process_time() - cpu) * 1000)
    return statistics.median(walls), statistics.median(cpus), result


async def _measure(model_dir: str, tokens: int, repeat: int) -> dict[str, Any]:
    from vllm import __version__ as vllm_version
    from vllm.engine.arg_utils import EngineArgs
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.renderers.online_renderer import OnlineRenderer
    from vllm.renderers.registry import renderer_from_config

    from convstate_vllm.cache import ModelIdentity, PromptCache
    from convstate_vllm.handles import Registry
    from convstate_vllm.protocol import CacheRequest, parse_cache_request
    from convstate_vllm.render import ChatRenderer

    max_model_len = 1 << (tokens + 8192).bit_length()
    config = EngineArgs(model=model_dir, max_model_len=max_model_len).create_engine_config()
    online = OnlineRenderer(
        config.model_config,
        renderer_from_config(config),
        request_logger=None,
        chat_template=None,
        chat_template_content_format="auto",
    )
    cache = PromptCache(
        ChatRenderer(online), {MODEL: ModelIdentity({}, "bench")}, MODEL, Registry(capacity=4096, ttl=3600)
    )
    tools = [
        {
            "type": "function",
            "function": {
                "name": "read_log",
                "description": "Read the last lines of a log file.",
                "parameters": {
                    "type": "object",
                    "properties": {"path": {"type": "string"}, "lines": {"type": "integer"}},
                    "required": ["path"],
                },
            },
        }
    ]
    # The body fields convstate sends besides the messages (model, salt, its settings).
    settings = {"model": MODEL, "cache_salt": SALT, "tools": tools, "tool_choice": "none", "max_tokens": 64}

    def body(messages: list[dict[str, Any]], **extra: Any) -> bytes:
        return json.dumps({**settings, "messages": messages, **extra}, separators=(",", ":")).encode()

    async def full(raw: bytes) -> list[int]:
        result = await online.render_chat(ChatCompletionRequest.model_validate_json(raw))
        (engine_input,) = result[1]
        return list(engine_input["prompt_token_ids"])

    async def seeded(raw: bytes) -> list[int]:
        request = ChatCompletionRequest.model_validate_json(raw)
        assert request.model_extra is not None
        planned = await cache.continue_from(
            request, parse_cache_request(request.model_extra.pop("prompt_cache"))
        )
        request.kv_transfer_params = {"prompt_token_ids": list(planned.ids)}
        await online.render_chat(request)
        return planned.ids

    tokenizer = online.renderer.tokenizer
    generated: tuple[list[int], list[int]] | None = None  # the previous turn's prompt and output ids
    rng = random.Random(7)
    history: list[dict[str, Any]] = [{"role": "system", "content": "You are a careful on-call assistant."}]
    handle: dict[str, Any] | None = None
    carried: list[dict[str, Any]] = []
    samples: list[dict[str, Any]] = []
    turn = 0
    while not samples or samples[-1]["prompt_tokens"] < tokens:
        turn += 1
        new, reply = _turn(rng, turn)
        whole = [*history, *new]
        full_body = body(whole, prompt_cache={"register": True})
        full_ms, full_cpu, expected = await _timed(repeat, partial(full, full_body))
        sample: dict[str, Any] = {
            "turn": turn,
            "prompt_tokens": len(expected),
            "full_ms": full_ms,
            "full_cpu_ms": full_cpu,
            "full_bytes": len(full_body),
        }
        if handle is None:
            request = ChatCompletionRequest.model_validate_json(full_body)
            planned = await cache.render_full(request)
        else:
            reference = {key: handle[key] for key in ("ref", "fingerprint")}
            reference |= {
                "tokens": handle["safe_tokens"],
                "prefix_hash": handle["prefix_hash"],
                "register": True,
            }
            cache_body = body([*carried, *new], prompt_cache=reference)

            async def continued(raw: bytes = cache_body, reference: dict[str, Any] = reference) -> Any:
                request = ChatCompletionRequest.model_validate_json(raw)
                planned = await cache.continue_from(request, CacheRequest(**reference))
                request.kv_transfer_params = {"prompt_token_ids": list(planned.ids)}
                await online.render_chat(request)
                return request, planned

            cache_ms, cache_cpu, (request, planned) = await _timed(repeat, continued)
            sample |= {"cache_ms": cache_ms, "cache_cpu_ms": cache_cpu, "cache_bytes": len(cache_body)}
        assert planned is not None and planned.ids == expected, f"turn {turn}: the cache path differs"
        if generated is not None and handle is not None:
            seed = {"prompt_token_ids": generated[0], "output_token_ids": generated[1]}
            seed["covers_output"] = handle["covers_output"]
            seed_body = body([*carried, *new], prompt_cache={"seed": seed, "fingerprint": "bench"})
            seed_ms, seed_cpu, ids = await _timed(repeat, partial(seeded, seed_body))
            assert ids == expected, f"turn {turn}: the seeded path differs"
            sample |= {"seed_ms": seed_ms, "seed_cpu_ms": seed_cpu, "seed_bytes": len(seed_body)}
        register_ms, register_cpu, handle = await _timed(
            repeat, partial(cache.register, planned, request, reply)
        )
        assert handle is not None
        sample |= {"register_ms": register_ms, "register_cpu_ms": register_cpu}
        samples.append(sample)
        # A model's output for a text reply: its tokens and the end of its turn.
        output = [*tokenizer.encode(reply["content"] or "", add_special_tokens=False), tokenizer.eos_token_id]
        generated = None if reply.get("tool_calls") else (expected, output)
        carried = [] if handle["covers_output"] else [reply]
        history = [*whole, reply]
        if reply.get("tool_calls"):
            call_id = reply["tool_calls"][0]["id"]
            history.append({"role": "tool", "tool_call_id": call_id, "content": _text(rng, 200)})
            carried.append(history[-1])
    return {
        "name": NAME,
        "vllm": vllm_version,
        "model": MODEL,
        "max_model_len": max_model_len,
        "repeat": repeat,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "turns": samples,
    }


def measure(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(prog="bench.vllm_render measure")
    parser.add_argument("--model-dir", default=os.environ.get("CONVSTATE_VLLM_MODEL_DIR"))
    parser.add_argument("--tokens", type=int, default=24000, help="grow the conversation to this many")
    parser.add_argument("--repeat", type=int, default=9)
    args = parser.parse_args(argv)
    if not args.model_dir:
        parser.error("--model-dir (or CONVSTATE_VLLM_MODEL_DIR) must name the SmolLM2 model folder")
    # SmolLM2 was trained to 8,192 positions; nothing is generated here, only rendered and tokenized.
    os.environ.setdefault("VLLM_ALLOW_LONG_MAX_MODEL_LEN", "1")
    result = asyncio.run(_measure(args.model_dir, args.tokens, args.repeat))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{NAME}.json").write_text(json.dumps(result, indent=1))
    last = result["turns"][-1]
    keys = ("turn", "prompt_tokens", "full_ms", "cache_ms", "register_ms", "seed_ms")
    summary = {key: last.get(key) for key in keys}
    print(json.dumps({"max_model_len": result["max_model_len"], "deepest": summary}))


def plot(argv: Sequence[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parser = argparse.ArgumentParser(prog="bench.vllm_render plot")
    parser.add_argument("--out", default=str(RESULTS / f"{NAME}.png"))
    args = parser.parse_args(argv)
    result = json.loads((RESULTS / f"{NAME}.json").read_text())
    turns = [t for t in result["turns"] if "cache_ms" in t]
    x = [t["prompt_tokens"] for t in turns]
    fig, (ax_cpu, ax_wall, ax_bytes) = plt.subplots(3, 1, figsize=(9, 11), sharex=True)
    for axis, unit in ((ax_cpu, "cpu_ms"), (ax_wall, "ms")):
        full, cache, register = (f"{path}_{unit}" for path in ("full", "cache", "register"))
        axis.plot(x, [t[full] for t in turns], "-", color="tab:red", label="full: vLLM renders the history")
        axis.plot(x, [t[cache] for t in turns], "-", color="tab:blue", label="cache_ref: before generation")
        axis.plot(
            x,
            [t[cache] + t[register] for t in turns],
            "--",
            color="tab:blue",
            label="cache_ref: and the next handle's registration",
        )
        seeded = [t for t in turns if f"seed_{unit}" in t]
        axis.plot(
            [t["prompt_tokens"] for t in seeded],
            [t[f"seed_{unit}"] for t in seeded],
            ":",
            color="tab:green",
            label="seed: before generation, the handle gone",
        )
        axis.set_ylim(bottom=0)
    ax_cpu.set_ylabel("CPU per turn (ms, median)\nparse + render + tokenize")
    ax_wall.set_ylabel("wall time per turn (ms, median)\non a shared 2-core machine")
    ax_bytes.plot(x, [t["full_bytes"] for t in turns], "-", color="tab:red", label="full")
    ax_bytes.plot(x, [t["cache_bytes"] for t in turns], "-", color="tab:blue", label="cache_ref")
    seeded = [t for t in turns if "seed_bytes" in t]
    ax_bytes.plot(
        [t["prompt_tokens"] for t in seeded],
        [t["seed_bytes"] for t in seeded],
        ":",
        color="tab:green",
        label="seed",
    )
    ax_bytes.set_ylabel("request bytes to vLLM")
    ax_bytes.set_yscale("log")
    ax_bytes.set_xlabel("prompt tokens of the turn")
    for axis in (ax_cpu, ax_wall, ax_bytes):
        axis.grid(True, alpha=0.3)
        axis.legend(loc="upper left")
    fig.suptitle(f"vLLM {result['vllm']}, {result['model']}: the full path against the convstate-vllm plugin")
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    plt.close(fig)
    print(args.out)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("command", choices=("measure", "plot"))
    args, rest = parser.parse_known_args(argv)
    (measure if args.command == "measure" else plot)(rest)


if __name__ == "__main__":
    main()
