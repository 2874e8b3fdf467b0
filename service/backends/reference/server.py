"""The reference backend's HTTP app: vLLM's OpenAI-compatible surface plus the prompt_cache
extension (docs/backend-protocol.md), counters, and fault injection for tests."""

from __future__ import annotations

import asyncio
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import orjson
import xxhash
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse

from service.backends.reference.config import ReferenceSettings
from service.backends.reference.generate import Completion, GenerationSettings, complete, plan_reply
from service.backends.reference.media import inline_remote_media
from service.backends.reference.protocol import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    PromptCacheMiss,
    PromptCacheRequest,
    Seed,
    bad_request,
    parse_chat_request,
    parse_completion_request,
    parse_json,
    render_inputs,
    resolve_model,
)
from service.backends.reference.render import (
    GENERATION_PROMPT,
    PROFILE_TEMPLATES,
    RENDERER_VERSION,
    Encoder,
    Message,
    NotAppendable,
    RenderError,
    canonical_json,
    message_text,
    render_append,
    render_full,
)
from service.backends.reference.state import Handle, HandleRegistry, PrefixCache, TokenChain
from service.backends.reference.tokenizer import (
    IM_END,
    IM_START,
    THINK_OPEN,
    load_tokenizer,
    tokenizer_fingerprint,
    utf8_pieces,
)
from service.domain.prefix import token_digest

MODEL_REVISION = "convstate-ref-generator/1"


def json_response(body: object, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json", headers=headers)


@dataclass
class Counters:
    requests: int = 0  # chat completions and completions
    tokenize_requests: int = 0  # /tokenize, /detokenize and render
    bytes_received: int = 0
    tokens_rendered: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    hits: int = 0
    seeds: int = 0  # prompts continued from seeded token ids (prompt_cache.seed), rendering none of them
    misses: dict[str, int] = field(default_factory=dict)
    full_renders: int = 0
    injected_failures: int = 0
    restarts: int = 0
    # Reuses of a handle whose fingerprint, salt or render context differ from the request's (only
    # possible with verify_handles off): each is a wrong reuse the caller should never have asked for.
    stale_reuses: int = 0


@dataclass
class Faults:
    fail_count: int = 0
    fail_status: int = 503
    latency_ms: float = 0.0
    # Streams: the next `abort_streams` streamed completions drop the connection after
    # `abort_after_chunks` chunks (an engine dying mid-generation), or with `abort_as_error` end the
    # stream with an error event as vLLM does for a failure inside generation; every chunk waits
    # `chunk_delay_ms`.
    abort_streams: int = 0
    abort_after_chunks: int = 0
    abort_as_error: bool = False
    chunk_delay_ms: float = 0.0
    # The next `extra_streams` streamed completions send these raw deltas after the generated ones (a
    # misbehaving engine or parser: reasoning after text, characters a database rejects).
    extra_streams: int = 0
    extra_deltas: list[dict[str, Any]] = field(default_factory=list)


class StreamAborted(Exception):
    """Raised inside a streaming body: the server drops the connection without finishing the stream."""


@dataclass(frozen=True)
class Prompt:
    """A rendered prompt: the whole token sequence and where it came from."""

    tokens: list[int]
    new_tokens: list[int]  # the part rendered for this request (all of it on the full path)
    generation_prompt: int  # trailing tokens that are the generation prompt
    base: TokenChain | None  # the handle's tokens the prompt continues, if any
    system_open: bool
    last: Message
    # Where the ids a reply reports begin: after those the continued handle shares with the prompt that
    # registered it (the caller stored them with that turn); 0 for a full render or a seed.
    reported_from: int = 0

    @property
    def reported_ids(self) -> list[int]:
        return self.tokens[self.reported_from :]

    @property
    def body_new(self) -> list[int]:
        return self.new_tokens[: len(self.new_tokens) - self.generation_prompt]

    @property
    def body_len(self) -> int:
        return len(self.tokens) - self.generation_prompt


@dataclass(frozen=True)
class Turn:
    request: ChatRequest
    prompt: Prompt
    digest: str
    cached_tokens: int
    created_cache_tokens: int
    completion: Completion
    prompt_cache: dict[str, Any] | None


@dataclass(frozen=True)
class TextTurn:
    """One /v1/completions request: the prompt tokenized as it is, and its continuation."""

    request: CompletionRequest
    prompt_tokens: int
    digest: str
    cached_tokens: int
    created_cache_tokens: int
    completion: Completion


# Plain text continues like a user message of no particular template.
_TEXT_SETTINGS = GenerationSettings(
    tools=(), tool_choice="none", parallel_tool_calls=False, response_format=None, seed=None, thinking=False
)


class Backend:
    """All mutable state of one backend process; an /admin/restart starts a new epoch."""

    def __init__(self, settings: ReferenceSettings) -> None:
        self.settings = settings
        self.profiles = settings.model_profiles()
        self.encoder = Encoder(load_tokenizer())
        self.fingerprint_parts = {
            model: self._fingerprint_parts(model, p) for model, p in self.profiles.items()
        }
        self.fingerprints = {model: _fingerprint(parts) for model, parts in self.fingerprint_parts.items()}
        self.epoch = secrets.token_hex(8)
        self.handles = HandleRegistry(settings.max_handles, settings.handle_ttl_seconds)
        self.prefix_cache = PrefixCache(settings.block_size, settings.prefix_cache_blocks)
        self.counters = Counters()
        self.faults = Faults()
        self.created = int(time.time())

    def _fingerprint_parts(self, model: str, profile: str) -> dict[str, Any]:
        return {
            "model": model,
            "revision": MODEL_REVISION,
            "tokenizer": tokenizer_fingerprint(),
            "renderer": RENDERER_VERSION,
            "chat_template": xxhash.xxh3_128_hexdigest(PROFILE_TEMPLATES[profile].encode("utf-8")),
            "lora": None,
            "block_size": self.settings.block_size,
        }

    # --- request plumbing ----------------------------------------------------------------------

    async def delay(self) -> None:
        if self.faults.latency_ms > 0:
            await asyncio.sleep(self.faults.latency_ms / 1000)

    async def receive(self, request: Request) -> dict[str, Any]:
        """Latency, byte counting and injected failures for the model endpoints, then the body."""
        await self.delay()
        raw = await request.body()
        self.counters.bytes_received += len(raw)
        if self.faults.fail_count > 0:
            self.faults.fail_count -= 1
            self.counters.injected_failures += 1
            raise ApiError(self.faults.fail_status, "Injected failure (reference backend fault injection)")
        body = parse_json(raw)
        await inline_remote_media(body)
        return body

    def restart(self) -> None:
        self.epoch = secrets.token_hex(8)
        self.handles.clear()
        self.prefix_cache.clear()
        self.counters.restarts += 1

    def reload(self, model: str, parts: Mapping[str, Any]) -> None:
        """Swap what a model runs under (weights revision, adapter, template...) in place, as a hot reload
        does: same epoch, handles kept, new fingerprint. Handles made before are stale from now on."""
        self.fingerprint_parts[model] = {**self.fingerprint_parts[model], **parts}
        self.fingerprints[model] = _fingerprint(self.fingerprint_parts[model])

    def miss(self, code: str, message: str) -> PromptCacheMiss:
        self.counters.misses[code] = self.counters.misses.get(code, 0) + 1
        return PromptCacheMiss(code, message)

    # --- rendering -----------------------------------------------------------------------------

    def _check_length(self, count: int, max_tokens: int | None) -> None:
        limit = self.settings.max_model_len
        if count >= limit:
            raise bad_request(
                f"This model's maximum context length is {limit} tokens. However, your request has "
                f"{count} input tokens. Please reduce the length of the input messages.",
                param="input_tokens",
            )
        if max_tokens is not None and count + max_tokens > limit:
            raise bad_request(
                f"'max_tokens' or 'max_completion_tokens' is too large: {max_tokens}. This model's "
                f"maximum context length is {limit} tokens and your request has {count} input tokens "
                f"({max_tokens} > {limit} - {count}).",
                param="max_tokens",
            )

    def render_prompt(self, req: ChatRequest, now: float) -> Prompt:
        """The prompt of a chat request: continued from a verified handle, or rendered in full."""
        pc = req.prompt_cache
        base: TokenChain | None = None
        reported_from = 0
        if pc is not None and (pc.ref is not None or pc.seed is not None):
            if pc.ref is not None:
                handle = self._verify(pc.ref, pc, req, now)
                base, system_open, previous = handle.chain, handle.system_open, handle.last_message
                reported_from = handle.shared_tokens
                self.counters.hits += 1
            else:
                assert pc.seed is not None
                base, system_open = self._seeded(pc.seed, pc, req)
                previous = None
                self.counters.seeds += 1
            try:
                appended = render_append(req.ctx, system_open, req.messages)
            except NotAppendable as exc:
                raise self.miss("not_appendable", str(exc)) from exc
            last = req.messages[-1] if req.messages else previous
            if last is None:
                raise self.miss("not_appendable", "a seeded prefix must be followed by a message")
        else:
            if not req.messages:
                raise bad_request("`messages` must not be empty", param="messages")
            appended = render_full(req.ctx, req.messages)
            last = req.messages[-1]
            self.counters.full_renders += 1
        gen = self.encoder.generation_prompt if req.add_generation_prompt else []
        new = self.encoder.encode(appended.text + (GENERATION_PROMPT if gen else ""))
        self.counters.tokens_rendered += len(new)
        tokens = (base.tokens().tolist() if base else []) + new
        self._check_length(len(tokens), req.max_tokens)
        return Prompt(tokens, new, len(gen), base, appended.system_open, last, reported_from)

    def _verify(self, ref: str, pc: PromptCacheRequest, req: ChatRequest, now: float) -> Handle:
        """The handle checks, in the protocol's order; each failure is a typed 409. Without
        verify_handles, the salt, fingerprint and context checks only count a stale reuse."""
        handle = self.handles.get(ref)
        verify = self.settings.verify_handles
        current = self.fingerprints[req.model]
        if (
            handle is None
            or handle.epoch != self.epoch
            or (verify and handle.cache_salt != req.ctx.cache_salt)
        ):
            raise self.miss("unknown_ref", "prompt_cache.ref is not known to this backend")
        if handle.expires_at <= now:
            self.handles.remove(handle.ref)
            raise self.miss("expired", "prompt_cache.ref has expired")
        if verify and (pc.fingerprint != current or handle.fingerprint != current):
            raise self.miss("fingerprint_mismatch", "prompt_cache.fingerprint differs from the model's")
        if pc.tokens != handle.chain.count or pc.prefix_hash != handle.chain.digest_hex:
            raise self.miss("prefix_mismatch", "prompt_cache.tokens/prefix_hash differ from the handle's")
        if verify and handle.context_hash != req.ctx.context_hash:
            raise self.miss(
                "prefix_mismatch", "tools, reasoning or template settings differ from the handle's"
            )
        stale = (handle.cache_salt, handle.fingerprint, handle.context_hash) != (
            req.ctx.cache_salt,
            current,
            req.ctx.context_hash,
        )
        self.counters.stale_reuses += stale
        return handle

    def _seeded(self, seed: Seed, pc: PromptCacheRequest, req: ChatRequest) -> tuple[TokenChain, bool]:
        """The prefix an earlier turn's ids stand for, without rendering them: its prompt and output
        followed by what the template puts after a message (`covers_output`), or its prompt without the
        generation prompt. The caller vouches for the ids (they are what this model generated from and
        generated under `pc.fingerprint`); what the template would not keep is a typed miss. Returns the
        prefix and whether it ends inside the leading system block (it holds one message at most)."""
        if pc.fingerprint != self.fingerprints[req.model]:
            if self.settings.verify_handles:
                raise self.miss("fingerprint_mismatch", "prompt_cache.fingerprint differs from the model's")
            self.counters.stale_reuses += 1
        encoder = self.encoder
        prompt, output = seed.prompt_token_ids, seed.output_token_ids
        if not (encoder.valid(prompt) and encoder.valid(output)):
            raise bad_request("`prompt_cache.seed` holds ids outside the vocabulary", "prompt_cache.seed")
        generation = encoder.generation_prompt
        if seed.covers_output:
            [end] = encoder.encode(IM_END)
            [think] = encoder.encode(THINK_OPEN)
            if not output or output[-1] != end:
                raise self.miss("not_appendable", "the seeded output does not end its message")
            if req.ctx.profile == "reasoning-trim" and think in output:
                raise self.miss("not_appendable", "this template drops the seeded output's reasoning")
            ids = [*prompt, *output, *encoder.encode("\n")]
        else:
            if prompt[len(prompt) - len(generation) :] != generation:
                raise self.miss("not_appendable", "the seeded prompt does not end with the generation prompt")
            ids = prompt[: len(prompt) - len(generation)]
        [start] = encoder.encode(IM_START)
        return TokenChain(None, ids), ids.count(start) <= 1

    # --- one turn ------------------------------------------------------------------------------

    def run_turn(self, req: ChatRequest) -> Turn:
        now = time.time()
        prompt = self.render_prompt(req, now)
        digest = token_digest(prompt.tokens)
        cached = self.prefix_cache.lookup(req.model, req.ctx.cache_salt, prompt.tokens)
        # Like vLLM's created_cache_tokens: the prompt's full blocks this turn computed and cached.
        block = self.prefix_cache.block_size
        created = max(0, len(prompt.tokens) // block * block - cached)
        max_tokens = req.max_tokens or self.settings.max_model_len - len(prompt.tokens)
        completion = complete(plan_reply(digest, prompt.last, req.generation), self.encoder, max_tokens)
        # Generated tokens are cached too (all but the last, whose KV is never computed).
        self.prefix_cache.insert(req.model, req.ctx.cache_salt, prompt.tokens + completion.token_ids[:-1])
        self.counters.prompt_tokens += len(prompt.tokens)
        self.counters.cached_tokens += cached
        self.counters.completion_tokens += len(completion.token_ids)
        pc = req.prompt_cache
        registered = self._register(req, prompt, completion, now) if pc is not None and pc.register else None
        return Turn(req, prompt, digest, cached, created, completion, registered)

    def _register(
        self, req: ChatRequest, prompt: Prompt, completion: Completion, now: float
    ) -> dict[str, Any]:
        """A handle for this turn: through the re-rendered assistant message when that is append-safe,
        else only through the request's last message."""
        reply = completion.message()
        reply_tokens = self.encoder.encode(message_text(req.ctx.profile, reply))
        self.counters.tokens_rendered += len(reply_tokens)
        # Dropped reasoning means what the model generated is not what the next render holds.
        safe = not (req.ctx.profile == "reasoning-trim" and completion.reasoning_tokens > 0)
        covered = prompt.body_new + (reply_tokens if safe else [])
        chain = prompt.base.extend(covered) if prompt.base else TokenChain(None, covered)
        handle = self.handles.add(
            epoch=self.epoch,
            cache_salt=req.ctx.cache_salt,
            context_hash=req.ctx.context_hash,
            fingerprint=self.fingerprints[req.model],
            chain=chain,
            shared_tokens=prompt.body_len,
            system_open=prompt.system_open and not safe,
            last_message=reply if safe else prompt.last,
            now=now,
        )
        return {
            "ref": handle.ref,
            "epoch": self.epoch,
            "tokens": prompt.body_len + len(reply_tokens),
            "safe_boundary": safe,
            "safe_tokens": chain.count,
            "prefix_hash": chain.digest_hex,
            "covers_output": safe,
            "expires_at": handle.expires_at,
            "fingerprint": self.fingerprints[req.model],
            "reused_tokens": prompt.base.count if prompt.base else 0,
        }

    def run_completion(self, req: CompletionRequest) -> TextTurn:
        """A text completion: the prompt is tokenized as sent, and continued deterministically."""
        tokens = self.encoder.encode(req.prompt)
        self.counters.tokens_rendered += len(tokens)
        self._check_length(len(tokens), req.max_tokens)
        digest = token_digest(tokens)
        cached = self.prefix_cache.lookup(req.model, req.cache_salt, tokens)
        block = self.prefix_cache.block_size
        settings = replace(_TEXT_SETTINGS, seed=req.seed)
        completion = complete(
            plan_reply(digest, Message("user", req.prompt), settings), self.encoder, req.max_tokens
        )
        self.prefix_cache.insert(req.model, req.cache_salt, tokens + completion.token_ids[:-1])
        self.counters.prompt_tokens += len(tokens)
        self.counters.cached_tokens += cached
        self.counters.completion_tokens += len(completion.token_ids)
        created = max(0, len(tokens) // block * block - cached)
        return TextTurn(req, len(tokens), digest, cached, created, completion)

    # --- replies -------------------------------------------------------------------------------

    def usage(self, turn: Turn | TextTurn) -> dict[str, Any]:
        prompt_tokens = len(turn.prompt.tokens) if isinstance(turn, Turn) else turn.prompt_tokens
        completion_tokens = len(turn.completion.token_ids)
        return {
            "prompt_tokens": prompt_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "completion_tokens": completion_tokens,
            "prompt_tokens_details": {
                "cached_tokens": turn.cached_tokens,
                "created_cache_tokens": turn.created_cache_tokens,
            },
            "completion_tokens_details": {"reasoning_tokens": turn.completion.reasoning_tokens},
        }

    def extension_fields(self, turn: Turn) -> dict[str, Any]:
        fields: dict[str, Any] = {"prompt_digest": turn.digest}
        if turn.prompt_cache is not None:
            fields["prompt_cache"] = turn.prompt_cache
        return fields

    def logprobs(self, turn: Turn) -> dict[str, Any] | None:
        """Deterministic stand-in log-probabilities: a hash of the digest, position and token."""
        if not turn.request.logprobs:
            return None
        ids = turn.completion.token_ids
        entries = []
        for position, (token, text) in enumerate(zip(ids, self._token_texts(ids), strict=True)):
            key = f"{turn.digest}:{position}:{token}".encode()
            entry = {
                "token": text,
                "logprob": -(xxhash.xxh3_64_intdigest(key) % 4000) / 1000,
                "bytes": list(self.encoder.bytes_of([token])),
            }
            entries.append({**entry, "top_logprobs": [entry] if turn.request.top_logprobs else []})
        return {"content": entries}

    def _token_texts(self, ids: list[int]) -> list[str]:
        return [self.encoder.bytes_of([t]).decode("utf-8", errors="replace") for t in ids]

    def completion_body(self, turn: Turn, completion_id: str) -> dict[str, Any]:
        completion, req = turn.completion, turn.request
        reply = completion.message()
        message = {
            "role": "assistant",
            "content": reply.text or None,
            "refusal": None,
            "annotations": None,
            "audio": None,
            "function_call": None,
            "tool_calls": completion.tool_call_objects(),
            # vLLM renamed reasoning_content to reasoning; both are sent for either client.
            "reasoning": reply.reasoning,
            "reasoning_content": reply.reasoning,
        }
        choice = {
            "index": 0,
            "message": message,
            "logprobs": self.logprobs(turn),
            "finish_reason": completion.finish_reason,
            "stop_reason": None,
            "token_ids": completion.token_ids if req.return_token_ids else None,
        }
        return {
            "id": completion_id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": req.model,
            "choices": [choice],
            "service_tier": None,
            "system_fingerprint": None,
            "usage": self.usage(turn),
            "prompt_logprobs": None,
            "kv_transfer_params": None,
            **self.prompt_ids(turn),
            **self.extension_fields(turn),
        }

    @staticmethod
    def prompt_ids(turn: Turn) -> dict[str, Any]:
        """`prompt_token_ids` as return_token_ids asks; after a ref, only those from
        `prompt_token_ids_start` on (the protocol's extension: the reply's size does not grow with the
        conversation)."""
        if not turn.request.return_token_ids:
            return {"prompt_token_ids": None}
        prompt = turn.prompt
        if prompt.reported_from:
            return {"prompt_token_ids": prompt.reported_ids, "prompt_token_ids_start": prompt.reported_from}
        return {"prompt_token_ids": prompt.tokens}

    async def stream(self, turn: Turn, completion_id: str) -> AsyncIterator[bytes]:
        """OpenAI chat.completion.chunk events as vLLM sends them; the extension fields ride on the
        usage chunk, or on the finishing chunk when no usage was asked for."""
        req = turn.request
        head = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": req.model,
        }

        def event(choices: list[dict[str, Any]], **top: Any) -> bytes:
            return b"data: " + orjson.dumps({**head, "choices": choices, **top}) + b"\n\n"

        def choice(delta: dict[str, Any], ids: list[int] | None, finish: str | None = None) -> dict[str, Any]:
            item: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            if req.return_token_ids and ids is not None:
                item["token_ids"] = ids
            return item

        prompt_ids = self.prompt_ids(turn) if req.return_token_ids else {}
        yield event([choice({"role": "assistant", "content": ""}, None)], **prompt_ids)
        events, rest = turn.completion.stream_deltas(self.encoder, self.settings.stream_chunk_tokens)
        abort_after = None
        if self.faults.abort_streams > 0:
            self.faults.abort_streams -= 1
            abort_after = self.faults.abort_after_chunks
        if self.faults.extra_streams > 0:
            self.faults.extra_streams -= 1
            events = [*events, *((extra, []) for extra in self.faults.extra_deltas)]
        for sent, (delta, ids) in enumerate(events):
            if abort_after is not None and sent >= abort_after:
                if not self.faults.abort_as_error:
                    raise StreamAborted(f"injected stream abort after {sent} chunks")
                # vLLM's in-band failure: an error object where a chunk would be, then [DONE], under 200.
                error = ApiError(500, f"Injected failure after {sent} chunks")
                yield b"data: " + orjson.dumps(error.body) + b"\n\ndata: [DONE]\n\n"
                return
            if self.faults.chunk_delay_ms:
                await asyncio.sleep(self.faults.chunk_delay_ms / 1000)
            yield event([choice(delta, ids)])
        finish = [choice({}, rest, turn.completion.finish_reason)]
        if req.include_usage:
            yield event(finish)
            yield event([], usage=self.usage(turn), **self.extension_fields(turn))
        else:
            yield event(finish, **self.extension_fields(turn))
        yield b"data: [DONE]\n\n"

    def text_completion_body(self, turn: TextTurn, completion_id: str) -> dict[str, Any]:
        choice = {
            "index": 0,
            "text": turn.completion.message().text,
            "logprobs": None,
            "finish_reason": turn.completion.finish_reason,
            "stop_reason": None,
            "prompt_logprobs": None,
        }
        return {
            "id": completion_id,
            "object": "text_completion",
            "created": int(time.time()),
            "model": turn.request.model,
            "choices": [choice],
            "service_tier": None,
            "system_fingerprint": None,
            "usage": self.usage(turn),
            "kv_transfer_params": None,
            "prompt_digest": turn.digest,
        }

    async def text_stream(self, turn: TextTurn, completion_id: str) -> AsyncIterator[bytes]:
        """text_completion chunks as vLLM streams them: the text in pieces, the finishing reason, then the
        usage if asked for."""
        head = {
            "id": completion_id,
            "object": "text_completion",
            "created": int(time.time()),
            "model": turn.request.model,
        }

        def event(choices: list[dict[str, Any]], **top: Any) -> bytes:
            return b"data: " + orjson.dumps({**head, "choices": choices, **top}) + b"\n\n"

        def choice(text: str, finish: str | None = None) -> dict[str, Any]:
            return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish, "stop_reason": None}

        events, _ = turn.completion.stream_deltas(self.encoder, self.settings.stream_chunk_tokens)
        for delta, _ids in events:
            if delta.get("content"):
                if self.faults.chunk_delay_ms:
                    await asyncio.sleep(self.faults.chunk_delay_ms / 1000)
                yield event([choice(delta["content"])])
        yield event([choice("", turn.completion.finish_reason)])
        if turn.request.include_usage:
            yield event([], usage=self.usage(turn), prompt_digest=turn.digest)
        yield b"data: [DONE]\n\n"

    # --- other endpoints -----------------------------------------------------------------------

    def model_cards(self) -> dict[str, Any]:
        cards = []
        for model, profile in self.profiles.items():
            cards.append(
                {
                    "id": model,
                    "object": "model",
                    "created": self.created,
                    "owned_by": "vllm",
                    "root": model,
                    "parent": None,
                    "max_model_len": self.settings.max_model_len,
                    "permission": [],
                    "prompt_cache": {
                        "seed": True,
                        "epoch": self.epoch,
                        "fingerprint": self.fingerprints[model],
                        "fingerprint_parts": self.fingerprint_parts[model],
                        "profile": profile,
                        "handle_ttl_seconds": self.settings.handle_ttl_seconds,
                    },
                }
            )
        return {"object": "list", "data": cards}

    def tokenize(self, body: dict[str, Any]) -> dict[str, Any]:
        model = resolve_model(body, self.profiles)
        if "messages" in body:
            ctx, messages = render_inputs(_without_reasoning_content(body), model, self.profiles[model])
            text = render_full(ctx, messages).text
            if body.get("add_generation_prompt", True) is not False:
                text += GENERATION_PROMPT
        elif isinstance(body.get("prompt"), str):
            text = body["prompt"]
        else:
            raise bad_request("`prompt` (a string) or `messages` is required", param="prompt")
        tokens = self.encoder.encode(text)
        self.counters.tokens_rendered += len(tokens)
        strs = (
            [self.encoder.tokenizer.id_to_token(t) for t in tokens] if body.get("return_token_strs") else None
        )
        return {
            "count": len(tokens),
            "max_model_len": self.settings.max_model_len,
            "tokens": tokens,
            "token_strs": strs,
            "prompt_digest": token_digest(tokens),
        }

    def detokenize(self, body: dict[str, Any]) -> dict[str, Any]:
        resolve_model(body, self.profiles)
        tokens = body.get("tokens")
        if not isinstance(tokens, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in tokens
        ):
            raise bad_request("`tokens` must be a list of integers", param="tokens")
        if not self.encoder.valid(tokens):
            raise bad_request("`tokens` holds ids outside the vocabulary", param="tokens")
        return {"prompt": utf8_pieces([self.encoder.bytes_of(tokens)])[0]}

    def render(self, body: dict[str, Any]) -> dict[str, Any]:
        """vLLM's /v1/chat/completions/render: the GenerateRequest the chat request would run."""
        req = parse_chat_request({k: v for k, v in body.items() if k != "prompt_cache"}, self.profiles)
        prompt = self.render_prompt(req, time.time())
        return {
            "request_id": uuid.uuid4().hex,
            "token_ids": prompt.tokens,
            "features": None,
            "sampling_params": req.sampling,
            "model": req.model,
            "stream": False,
            "stream_options": None,
            "cache_salt": req.ctx.cache_salt,
            "priority": 0,
            "kv_transfer_params": None,
            "prompt_digest": token_digest(prompt.tokens),
        }

    def stats(self) -> dict[str, Any]:
        counters = self.counters
        return {
            **counters.__dict__,
            "misses": dict(counters.misses),
            "handles": self.handles.live(time.time()),
            "epoch": self.epoch,
        }


def _without_reasoning_content(body: dict[str, Any]) -> dict[str, Any]:
    """vLLM's chat completions and render requests rename a history message's deprecated
    `reasoning_content` to `reasoning`; its /tokenize request does not, so there that field is dropped
    and only `reasoning` reaches the template. The reference backend does the same."""
    messages = body.get("messages")
    if not isinstance(messages, list):
        return body
    return {
        **body,
        "messages": [
            {k: v for k, v in m.items() if k != "reasoning_content"} if isinstance(m, dict) else m
            for m in messages
        ],
    }


def _fingerprint(parts: Mapping[str, Any]) -> str:
    return xxhash.xxh3_128_hexdigest(canonical_json(parts).encode("utf-8"))


def _int_field(body: Mapping[str, Any], key: str, default: int, low: int, high: int) -> int:
    value = body.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise bad_request(f"`{key}` must be an integer in [{low}, {high}]", param=key)
    return value


def create_app(settings: ReferenceSettings) -> FastAPI:
    backend = Backend(settings)
    app = FastAPI(title="convstate reference backend", version=RENDERER_VERSION)
    app.state.backend = backend

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> Response:
        return json_response(exc.body, exc.status)

    @app.exception_handler(RenderError)
    async def _render_error(_: Request, exc: RenderError) -> Response:
        return json_response(ApiError(400, str(exc), param="messages").body, 400)

    if settings.api_key:
        # vLLM's --api-key: a bearer token on /v1 paths, answered 401 in its own (non-OpenAI) shape.
        expected = f"Bearer {settings.api_key}"

        @app.middleware("http")
        async def _authenticate(
            request: Request, call_next: Callable[[Request], Awaitable[Response]]
        ) -> Response:
            if request.url.path.startswith("/v1") and not secrets.compare_digest(
                request.headers.get("authorization", ""), expected
            ):
                return json_response({"error": "Unauthorized"}, 401)
            return await call_next(request)

    @app.get("/health")
    async def health() -> Response:
        await backend.delay()
        return Response(status_code=200)

    @app.get("/v1/models")
    async def models() -> Response:
        await backend.delay()
        return json_response(backend.model_cards())

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        backend.counters.requests += 1
        req = parse_chat_request(await backend.receive(request), backend.profiles)
        turn = backend.run_turn(req)
        cost_us = (len(turn.prompt.tokens) - turn.cached_tokens) * settings.prefill_us_per_token
        if cost_us > 0:
            await asyncio.sleep(cost_us / 1e6)
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        headers = {"x-prompt-digest": turn.digest}
        if req.stream:
            return StreamingResponse(
                backend.stream(turn, completion_id), media_type="text/event-stream", headers=headers
            )
        return json_response(backend.completion_body(turn, completion_id), headers=headers)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        backend.counters.requests += 1
        turn = backend.run_completion(
            parse_completion_request(await backend.receive(request), backend.profiles)
        )
        cost_us = (turn.prompt_tokens - turn.cached_tokens) * settings.prefill_us_per_token
        if cost_us > 0:
            await asyncio.sleep(cost_us / 1e6)
        completion_id = f"cmpl-{uuid.uuid4().hex}"
        if turn.request.stream:
            return StreamingResponse(backend.text_stream(turn, completion_id), media_type="text/event-stream")
        return json_response(backend.text_completion_body(turn, completion_id))

    @app.post("/v1/chat/completions/render")
    async def render(request: Request) -> Response:
        backend.counters.tokenize_requests += 1
        return json_response(backend.render(await backend.receive(request)))

    @app.post("/tokenize")
    async def tokenize(request: Request) -> Response:
        backend.counters.tokenize_requests += 1
        return json_response(backend.tokenize(await backend.receive(request)))

    @app.post("/detokenize")
    async def detokenize(request: Request) -> Response:
        backend.counters.tokenize_requests += 1
        return json_response(backend.detokenize(await backend.receive(request)))

    @app.get("/stats")
    async def stats() -> Response:
        return json_response(backend.stats())

    @app.post("/stats/reset")
    async def stats_reset() -> Response:
        backend.counters = Counters()
        return json_response(backend.stats())

    @app.post("/admin/restart")
    async def admin_restart() -> Response:
        backend.restart()
        return json_response({"epoch": backend.epoch})

    @app.post("/admin/reload")
    async def admin_reload(request: Request) -> Response:
        body = parse_json(await request.body())
        model, parts = body.get("model"), body.get("parts")
        if model not in backend.profiles or not isinstance(parts, dict):
            raise bad_request("expected {model: a served model, parts: {fingerprint part: value}}")
        unknown = set(parts) - set(backend.fingerprint_parts[model])
        if unknown:
            raise bad_request(f"unknown fingerprint parts: {sorted(unknown)}", param="parts")
        backend.reload(model, parts)
        return json_response({"fingerprint": backend.fingerprints[model]})

    @app.post("/admin/evict")
    async def admin_evict(request: Request) -> Response:
        body = parse_json(await request.body())
        ref = body.get("ref")
        if ref is None:
            return json_response({"evicted": backend.handles.clear()})
        if not isinstance(ref, str):
            raise bad_request("`ref` must be a string", param="ref")
        return json_response({"evicted": int(backend.handles.remove(ref))})

    @app.post("/admin/expire")
    async def admin_expire() -> Response:
        return json_response({"expired": backend.handles.expire_all(time.time())})

    @app.post("/admin/fail")
    async def admin_fail(request: Request) -> Response:
        body = parse_json(await request.body())
        backend.faults.fail_count = _int_field(body, "count", 1, 0, 1_000_000)
        backend.faults.fail_status = _int_field(body, "status", 503, 400, 599)
        return json_response({"count": backend.faults.fail_count, "status": backend.faults.fail_status})

    @app.post("/admin/stream")
    async def admin_stream(request: Request) -> Response:
        body = parse_json(await request.body())
        faults = backend.faults
        faults.abort_streams = _int_field(body, "abort_count", 0, 0, 1_000_000)
        faults.abort_after_chunks = _int_field(body, "abort_after_chunks", 0, 0, 1_000_000)
        faults.abort_as_error = body.get("abort_as") == "error"
        faults.chunk_delay_ms = _int_field(body, "chunk_delay_ms", 0, 0, 60_000)
        extra = body.get("extra_deltas", [])
        if not isinstance(extra, list) or not all(isinstance(delta, dict) for delta in extra):
            raise ApiError(400, "'extra_deltas' must be a list of delta objects")
        faults.extra_deltas = extra
        faults.extra_streams = _int_field(body, "extra_count", 1 if extra else 0, 0, 1_000_000)
        return json_response(
            {
                "abort_count": faults.abort_streams,
                "abort_after_chunks": faults.abort_after_chunks,
                "abort_as": "error" if faults.abort_as_error else "disconnect",
                "chunk_delay_ms": faults.chunk_delay_ms,
                "extra_count": faults.extra_streams,
                "extra_deltas": faults.extra_deltas,
            }
        )

    @app.post("/admin/latency")
    async def admin_latency(request: Request) -> Response:
        body = parse_json(await request.body())
        backend.faults.latency_ms = _int_field(body, "ms", 0, 0, 600_000)
        return json_response({"ms": backend.faults.latency_ms})

    return app
