"""Request parsing and error shapes, following vLLM's OpenAI-compatible server where it has them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from service.backends.reference.generate import GenerationSettings
from service.backends.reference.render import Message, RenderContext, make_context, parse_messages

# vLLM names the error type after the HTTP status.
ERROR_TYPES = {
    400: "BadRequestError",
    404: "NotFoundError",
    429: "RateLimitError",
    500: "InternalServerError",
    502: "BadGatewayError",
    503: "ServiceUnavailableError",
    504: "GatewayTimeoutError",
}


class ApiError(Exception):
    """An error answered in vLLM's envelope: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        err_type: str | None = None,
        param: str | None = None,
        code: int | str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = {
            "error": {
                "message": message,
                "type": err_type or ERROR_TYPES.get(status, "Error"),
                "param": param,
                "code": status if code is None else code,
            }
        }


class PromptCacheMiss(ApiError):
    """A typed refusal to continue from a handle; the caller retries with the full history."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(409, message, err_type="prompt_cache_miss", param="prompt_cache", code=code)
        self.code = code


def bad_request(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param=param)


def parse_json(raw: bytes) -> dict[str, Any]:
    if not raw.strip():
        return {}
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise bad_request(f"Request body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise bad_request("Request body must be a JSON object")
    return body


def _opt(body: Mapping[str, Any], key: str, kind: type | tuple[type, ...], what: str) -> Any:
    """body[key] if present and not null, checked against `kind` (bool is never taken for int)."""
    value = body.get(key)
    if value is None:
        return None
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise bad_request(f"`{key}` must be {what}", param=key)
    return value


@dataclass(frozen=True)
class Seed:
    """A prefix given as the token ids of an earlier turn (`prompt_cache.seed`) instead of a handle."""

    prompt_token_ids: list[int]
    output_token_ids: list[int]
    covers_output: bool


@dataclass(frozen=True)
class PromptCacheRequest:
    ref: str | None
    tokens: int | None
    prefix_hash: str | None
    fingerprint: str | None
    register: bool
    seed: Seed | None = None


@dataclass(frozen=True)
class ChatRequest:
    model: str
    messages: list[Message]
    ctx: RenderContext
    generation: GenerationSettings
    max_tokens: int | None
    add_generation_prompt: bool
    stream: bool
    include_usage: bool
    return_token_ids: bool
    logprobs: bool
    top_logprobs: int
    prompt_cache: PromptCacheRequest | None
    sampling: dict[str, Any]


def resolve_model(body: Mapping[str, Any], profiles: Mapping[str, str]) -> str:
    """The requested model, or the first served one when none is named (as vLLM does)."""
    model = _opt(body, "model", str, "a string")
    if model is None:
        return next(iter(profiles))
    if model not in profiles:
        raise ApiError(404, f"The model `{model}` does not exist.", param="model")
    return str(model)


def render_inputs(body: Mapping[str, Any], model: str, profile: str) -> tuple[RenderContext, list[Message]]:
    """The render context and messages of a chat-shaped body (chat, render and /tokenize)."""
    if "messages" not in body:
        raise bad_request("`messages` is required", param="messages")
    tools = _tools(body)
    kwargs = _opt(body, "chat_template_kwargs", dict, "an object")
    effort = _opt(body, "reasoning_effort", str, "a string")
    salt = _opt(body, "cache_salt", str, "a string")
    if salt == "":
        raise bad_request("Parameter 'cache_salt' must be a non-empty string if provided.", "cache_salt")
    ctx = make_context(
        model,
        profile,
        tools=tools,
        reasoning_effort=effort,
        chat_template_kwargs=kwargs,
        cache_salt=salt,
        response_format=_response_format(body),
    )
    return ctx, parse_messages(body["messages"])


def _tools(body: Mapping[str, Any]) -> list[dict[str, Any]]:
    tools = _opt(body, "tools", list, "a list") or []
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if (
            not isinstance(function, dict)
            or not isinstance(function.get("name"), str)
            or tool.get("type", "function") != "function"
            or not isinstance(function.get("parameters") or {}, dict)
        ):
            raise bad_request(f"tools[{i}] must be a function tool with a name", param="tools")
    return tools


def _tool_choice(body: Mapping[str, Any], tools: Sequence[Mapping[str, Any]]) -> str | dict[str, Any]:
    """vLLM's rules: default "auto" with tools, "none" without; a named tool must exist."""
    if "tool_choice" not in body or body["tool_choice"] is None:
        return "auto" if tools else "none"
    choice = body["tool_choice"]
    if choice == "none":
        return "none"
    if not tools:
        if choice == "required" and "tools" in body:
            return "none"
        raise bad_request("When using `tool_choice`, `tools` must be set.", param="tool_choice")
    if choice in ("auto", "required"):
        return str(choice)
    function = choice.get("function") if isinstance(choice, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str) or not name:
        raise bad_request(
            'Invalid `tool_choice`: expected "none", "auto", "required" or '
            '{"type": "function", "function": {"name": "my_function"}}',
            param="tool_choice",
        )
    if all(t["function"]["name"] != name for t in tools):
        raise bad_request(
            "The tool specified in `tool_choice` does not match any of the specified `tools`",
            param="tool_choice",
        )
    return {"type": "function", "function": {"name": name}}


def _response_format(body: Mapping[str, Any]) -> dict[str, Any] | None:
    fmt = _opt(body, "response_format", dict, "an object")
    if fmt is None:
        return None
    kind = fmt.get("type")
    if kind not in ("text", "json_object", "json_schema"):
        raise bad_request(
            "`response_format.type` must be text, json_object or json_schema", "response_format"
        )
    if kind == "json_schema" and not isinstance(fmt.get("json_schema"), dict):
        raise bad_request("`response_format.json_schema` must be an object", "response_format")
    return dict(fmt)


def _prompt_cache(body: Mapping[str, Any]) -> PromptCacheRequest | None:
    raw = _opt(body, "prompt_cache", dict, "an object")
    if raw is None:
        return None
    ref = _opt(raw, "ref", str, "a string")
    tokens = _opt(raw, "tokens", int, "an integer")
    prefix_hash = _opt(raw, "prefix_hash", str, "a string")
    fingerprint = _opt(raw, "fingerprint", str, "a string")
    register = _opt(raw, "register", bool, "a boolean")
    if ref is not None and (tokens is None or prefix_hash is None or fingerprint is None):
        raise bad_request(
            "`prompt_cache` with a `ref` needs `tokens`, `prefix_hash` and `fingerprint`",
            param="prompt_cache",
        )
    seed = _seed(raw)
    if seed is not None and (ref is not None or fingerprint is None):
        raise bad_request(
            "`prompt_cache.seed` needs `fingerprint` and excludes `ref`", param="prompt_cache.seed"
        )
    return PromptCacheRequest(ref, tokens, prefix_hash, fingerprint, bool(register), seed)


def _token_ids(raw: Mapping[str, Any], key: str) -> list[int]:
    ids = raw.get(key)
    if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        raise bad_request(f"`prompt_cache.seed.{key}` must be a list of integers", param="prompt_cache.seed")
    return ids


def _seed(raw: Mapping[str, Any]) -> Seed | None:
    seed = _opt(raw, "seed", dict, "an object")
    if seed is None:
        return None
    covers_output = seed.get("covers_output")
    if not isinstance(covers_output, bool):
        raise bad_request("`prompt_cache.seed.covers_output` must be a boolean", param="prompt_cache.seed")
    return Seed(_token_ids(seed, "prompt_token_ids"), _token_ids(seed, "output_token_ids"), covers_output)


def parse_chat_request(body: Mapping[str, Any], profiles: Mapping[str, str]) -> ChatRequest:
    model = resolve_model(body, profiles)
    ctx, messages = render_inputs(body, model, profiles[model])
    tools = list(ctx.tools)
    sampling = {
        key: _opt(body, key, (int, float), "a number")
        for key in ("temperature", "top_p", "presence_penalty", "frequency_penalty")
    }
    seed = _opt(body, "seed", int, "an integer")
    if (_opt(body, "n", int, "an integer") or 1) != 1:
        raise bad_request("Only n=1 is supported by this server", param="n")
    max_tokens = _opt(body, "max_completion_tokens", int, "an integer")
    if max_tokens is None:
        max_tokens = _opt(body, "max_tokens", int, "an integer")
    if max_tokens is not None and max_tokens < 1:
        raise bad_request(f"max_tokens must be at least 1, got {max_tokens}.", param="max_tokens")
    stream = bool(_opt(body, "stream", bool, "a boolean"))
    stream_options = _opt(body, "stream_options", dict, "an object")
    if stream_options and not stream:
        raise bad_request("Stream options can only be defined when `stream=True`.", param="stream_options")
    logprobs = bool(_opt(body, "logprobs", bool, "a boolean"))
    top_logprobs = _opt(body, "top_logprobs", int, "an integer") or 0
    if top_logprobs and not logprobs:
        raise bad_request("when using `top_logprobs`, `logprobs` must be set to true.", param="top_logprobs")
    parallel = _opt(body, "parallel_tool_calls", bool, "a boolean")
    add_generation_prompt = _opt(body, "add_generation_prompt", bool, "a boolean")
    return ChatRequest(
        model=model,
        messages=messages,
        ctx=ctx,
        generation=GenerationSettings(
            tools=tools,
            tool_choice=_tool_choice(body, tools),
            parallel_tool_calls=parallel is not False,
            response_format=_response_format(body),
            seed=seed,
            thinking=ctx.thinking,
        ),
        max_tokens=max_tokens,
        add_generation_prompt=add_generation_prompt is not False,
        stream=stream,
        # vLLM's StreamOptions defaults include_usage to true once stream_options is given.
        include_usage=stream_options is not None and bool(stream_options.get("include_usage", True)),
        return_token_ids=bool(_opt(body, "return_token_ids", bool, "a boolean")),
        logprobs=logprobs,
        top_logprobs=top_logprobs,
        prompt_cache=_prompt_cache(body),
        sampling={**sampling, "seed": seed, "max_tokens": max_tokens},
    )


@dataclass(frozen=True)
class CompletionRequest:
    """A /v1/completions request: one prompt string, continued as plain text (no template)."""

    model: str
    prompt: str
    cache_salt: str | None
    seed: int | None
    max_tokens: int
    stream: bool
    include_usage: bool


# OpenAI's default for completions, which vLLM follows.
COMPLETION_MAX_TOKENS = 16


def parse_completion_request(body: Mapping[str, Any], profiles: Mapping[str, str]) -> CompletionRequest:
    model = resolve_model(body, profiles)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise bad_request("`prompt` must be a non-empty string (or a list of one)", param="prompt")
    if (_opt(body, "n", int, "an integer") or 1) != 1:
        raise bad_request("Only n=1 is supported by this server", param="n")
    max_tokens = _opt(body, "max_tokens", int, "an integer")
    if max_tokens is not None and max_tokens < 1:
        raise bad_request(f"max_tokens must be at least 1, got {max_tokens}.", param="max_tokens")
    salt = _opt(body, "cache_salt", str, "a string")
    stream = bool(_opt(body, "stream", bool, "a boolean"))
    stream_options = _opt(body, "stream_options", dict, "an object")
    return CompletionRequest(
        model=model,
        prompt=prompt,
        cache_salt=salt,
        seed=_opt(body, "seed", int, "an integer"),
        max_tokens=COMPLETION_MAX_TOKENS if max_tokens is None else max_tokens,
        stream=stream,
        include_usage=stream_options is not None and bool(stream_options.get("include_usage", True)),
    )
