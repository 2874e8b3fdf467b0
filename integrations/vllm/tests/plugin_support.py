"""Helpers of the plugin's tests: requests, prompt caches and vLLM's own renders."""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

from convstate_vllm.cache import ModelIdentity, PromptCache
from convstate_vllm.handles import Registry
from convstate_vllm.render import ChatRenderer

MODEL = "smollm2-135m-instruct"
TEMPLATES = Path(__file__).parent / "templates"
T = TypeVar("T")


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coroutine)


def template(name: str) -> str | None:
    """A template of tests/templates, or None for the model's own (SmolLM2's)."""
    return None if name == "smollm2" else (TEMPLATES / f"{name}.jinja").read_text()


def prompt_cache(online_renderer: Any, registry: Registry | None = None) -> PromptCache:
    renderer = ChatRenderer(online_renderer)
    identity = ModelIdentity({"model": MODEL}, "fp-" + MODEL)
    registry = registry if registry is not None else Registry(capacity=4096, ttl=600.0)
    return PromptCache(renderer, {MODEL: identity}, MODEL, registry)


def chat_request(messages: list[dict[str, Any]], **fields: Any) -> Any:
    return ChatCompletionRequest.model_validate({"model": MODEL, "messages": messages, **fields})


def vllm_prompt(online_renderer: Any, messages: list[dict[str, Any]], **fields: Any) -> list[int]:
    """vLLM's own render of a whole conversation: what its chat handler would generate from."""
    # vLLM's message parser changes the messages it is given (tool call arguments become objects).
    result = run(online_renderer.render_chat(chat_request(copy.deepcopy(messages), **fields)))
    assert isinstance(result, tuple), result
    (engine_input,) = result[1]
    ids: list[int] = list(engine_input["prompt_token_ids"])
    return ids
