"""The prompt cache of one API-server process: discovery, the ordered checks of a cache reference, the
prompt of a continued turn, and the handle registered after a reply.

A continued turn renders the whole conversation (the handle's messages, then the new ones) through the
chat template, checks that the text starts with the handle's text and that the cut there is proven by
the append rule, and tokenizes only the text after the cut: its prompt is the handle's token ids plus
those. A registered handle ends after the reply as the template renders it in history when that end is
a proven cut; otherwise before the generation prompt; otherwise there is no handle.

A seeded turn continues from the token ids an earlier turn was generated from (and generated) instead
of a handle, without the messages they were rendered from. Its prompt is the seeded prompt less the
generation prompt, followed by the tokens of what the template renders after it: the messages after the
seed (with `covers_output`, first the seeded reply as vLLM's chat handler read it) rendered after
stand-in histories, which must all give the same text, leave the history as it was, and (with
`covers_output`) start with the generation prompt and the output exactly as generated. The cut after the
seeded ids is proven on their decoded end, as any other. A handle registered on a seeded turn is a chain
rooted at the seed, and later turns render after the stand-ins in the same way.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from convstate_vllm.append import NotAppendable
from convstate_vllm.digest import text_digest
from convstate_vllm.handles import Handle, Message, Prefix, Registry, extend, seed_root
from convstate_vllm.protocol import BadPromptCache, CacheRequest, Miss, Seed
from convstate_vllm.render import ChatRenderer, plain

log = logging.getLogger("vllm.plugins.convstate")

PROFILE = "verified-append"
# A template may re-render the last assistant message once another message follows it (dropping its
# reasoning, say). For replies with reasoning the handle's end is checked against such a follower.
_PROBE = {"role": "user", "content": "."}
_MAX_CUTS = 8
# The histories the messages after a seed are rendered after, in place of the one the plugin never saw:
# the template must render those messages the same after each, and leave each as it was.
_STAND_INS: tuple[list[Message], ...] = (
    [{"role": "user", "content": "."}],
    [
        {"role": "system", "content": "."},
        {"role": "user", "content": "."},
        {"role": "assistant", "content": "."},
        {"role": "user", "content": "."},
    ],
)
# The seeded ids decoded to check the cut after them (no added token may span it): enough for the
# longest added token, a few bytes per token at worst.
_TAIL_TOKENS = 64


@dataclass(frozen=True, slots=True)
class ModelIdentity:
    parts: Mapping[str, Any]
    fingerprint: str


@dataclass(slots=True)
class Turn:
    """The prompt the plugin built for one chat request."""

    model: str
    fingerprint: str
    params: Any  # vLLM's ChatParams for the request
    context: str
    base: Prefix | None  # the handle's prefix this turn continues
    new_messages: list[Message]
    messages: list[Message]  # base's messages, then the new ones: what the template renders
    text: str  # the render, generation prompt included
    ids: list[int]  # its token ids, handed to the engine
    # The reply reports the prompt's ids from here on: the ones before are the continued handle's that
    # the turn registering it reported already.
    reported_from: int = 0


def reply_message(content: str | None, reasoning: str | None, tool_calls: list[dict[str, Any]]) -> Message:
    """The reply as the next request's history carries it: convstate's form of a response's output
    (text, or null with only tool calls; reasoning as `reasoning`; the calls)."""
    message: Message = {"role": "assistant", "content": content or (None if tool_calls else "")}
    if reasoning:
        message["reasoning"] = reasoning
    if tool_calls:
        message["tool_calls"] = [
            {
                "id": call.get("id"),
                "type": "function",
                "function": {
                    "name": (call.get("function") or {}).get("name") or "",
                    "arguments": (call.get("function") or {}).get("arguments") or "",
                },
            }
            for call in tool_calls
        ]
    return message


def common_prefix_length(a: str, b: str, start: int) -> int:
    """len of the common prefix of a and b, given that a[:start] == b[:start]."""
    low, high = start, min(len(a), len(b))
    if a[low:high] == b[low:high]:
        return high
    while low < high:
        middle = (low + high + 1) // 2
        if a[low:middle] == b[low:middle]:
            low = middle
        else:
            high = middle - 1
    return low


class PromptCache:
    def __init__(
        self,
        renderer: ChatRenderer,
        models: Mapping[str, ModelIdentity],
        default_model: str,
        registry: Registry,
    ) -> None:
        self.renderer = renderer
        self.models = dict(models)
        self.default_model = default_model
        self.registry = registry

    def model_of(self, request: Any) -> str:
        return str(request.model or self.default_model)

    def card(self, model: str) -> dict[str, Any] | None:
        """The discovery object of a served model; None where the plugin cannot continue prompts."""
        identity = self.models.get(model)
        if identity is None or self.renderer.unsupported is not None:
            return None
        return {
            "epoch": self.registry.epoch,
            "fingerprint": identity.fingerprint,
            "fingerprint_parts": dict(identity.parts),
            "profile": PROFILE,
            "handle_ttl_seconds": self.registry.ttl,
            "seed": True,
        }

    # --- before generation ----------------------------------------------------------------------------

    async def continue_from(self, request: Any, cache: CacheRequest, handler: Any = None) -> Turn:
        """The prompt of a request that continues a handle (`ref`) or a seed, after the protocol's checks
        in its order; a failed check raises its Miss, a malformed seed BadPromptCache. `handler` is
        vLLM's chat handler, whose parsers read a seeded reply."""
        request.messages = plain(request.messages)
        renderer = self.renderer
        model = self.model_of(request)
        identity = self.models.get(model)
        handle = self._live(request, cache) if cache.seed is None else None
        if (
            identity is None
            or cache.fingerprint != identity.fingerprint
            or (handle is not None and handle.fingerprint != identity.fingerprint)
        ):
            raise Miss("fingerprint_mismatch", "prompt_cache.fingerprint differs from the model's")
        if handle is not None and (cache.tokens, cache.prefix_hash) != (
            handle.prefix.count,
            handle.prefix.digest,
        ):
            raise Miss("prefix_mismatch", "prompt_cache.tokens/prefix_hash differ from the handle's")
        params = renderer.params(request)
        context = renderer.context(model, request.cache_salt, params, request)
        if handle is not None and context != handle.context:
            raise Miss(
                "prefix_mismatch", "the model, salt, tools or template settings differ from the handle's"
            )
        seed = cache.seed
        if seed is not None and not renderer.in_vocabulary([*seed.prompt_token_ids, *seed.output_token_ids]):
            raise BadPromptCache("`prompt_cache.seed` holds ids outside the vocabulary")
        reason = renderer.unsupported or renderer.unsupported_request(request)
        if reason is not None:
            raise Miss("not_appendable", reason)
        # What the render must hold after the base besides the new messages: a seeded reply, generated.
        lead: list[Message] = []
        generated = ""
        try:
            if seed is not None:
                base, lead, generated = await self._seeded(request, seed, params, handler)
            else:
                assert handle is not None
                base = handle.prefix
            new = [*lead, *request.messages]
            messages = [*base.all_messages(), *new]
            text = await self._render(base, messages, params, generation_prompt=True)
        except NotAppendable as exc:
            raise Miss("not_appendable", str(exc)) from None
        except Miss:
            raise
        except Exception as exc:  # the full resend gets vLLM's own error for it
            raise Miss("not_appendable", f"the conversation does not render ({type(exc).__name__})") from None
        if text_digest(text[: base.text_length]) != base.text_digest:
            raise Miss("not_appendable", "the template renders the cached prefix differently here")
        if not text.startswith(generated, base.text_length):
            raise Miss(
                "not_appendable", "the template renders the seeded reply otherwise than it was generated"
            )
        try:
            renderer.boundaries.check(text, base.text_length)
        except NotAppendable as exc:
            raise Miss("not_appendable", str(exc)) from None
        ids = [*base.token_ids(), *await renderer.encode(text[base.text_length :], request)]
        renderer.check_length(ids, request)
        # A seeded turn reports its whole prompt: the caller holds no turn that reported part of it here.
        reported_from = handle.shared if handle is not None else 0
        return Turn(
            model, identity.fingerprint, params, context, base, new, messages, text, ids, reported_from
        )

    def _live(self, request: Any, cache: CacheRequest) -> Handle:
        """The live handle a `ref` names, under the request's salt."""
        assert cache.ref is not None
        registry = self.registry
        handle = registry.get(cache.ref)
        if handle is None or handle.cache_salt != request.cache_salt:
            raise Miss("unknown_ref", "prompt_cache.ref is not known to this server")
        if handle.expires_at <= registry.now():
            registry.remove(handle.ref)
            raise Miss("expired", "prompt_cache.ref has expired")
        return handle

    async def _seeded(
        self, request: Any, seed: Seed, params: Any, handler: Any
    ) -> tuple[Prefix, list[Message], str]:
        """The root of the chain a seed stands for: its prompt without the generation prompt. With
        `covers_output`, also the seeded reply (as vLLM's chat handler read it from the output) and the
        text it was generated as (the generation prompt, then the output): the render after the root must
        start with that text, or the template would not keep what was generated."""
        renderer = self.renderer
        if not request.messages:
            raise Miss("not_appendable", "a seeded prefix must be followed by a message")
        generation = await self._after_history([], params, generation_prompt=True)
        generation_ids = await renderer.encode(generation, request) if generation else []
        prompt = seed.prompt_token_ids
        cut = len(prompt) - len(generation_ids)
        if cut < 0 or prompt[cut:] != generation_ids:
            raise Miss("not_appendable", "the seeded prompt does not end with the generation prompt")
        tail = renderer.decode(prompt[max(0, cut - _TAIL_TOKENS) : cut], skip_special_tokens=False)
        root = seed_root(prompt[:cut], tail, text_digest(tail))
        if not seed.covers_output:
            return root, [], ""
        output = seed.output_token_ids
        if not output or not renderer.is_special(output[-1]):
            raise Miss("not_appendable", "the seeded output does not end its message")
        reply = self._read_reply(request, prompt, output, handler)
        return root, [reply], generation + renderer.decode(output, skip_special_tokens=False)

    def _read_reply(self, request: Any, prompt: list[int], output: list[int], handler: Any) -> Message:
        """A seeded output as the reply message vLLM's chat handler makes of it (with the server's
        reasoning and tool parsers), in convstate's form. Tool calls are refused: their message is what
        the parser made of the text, and a template renders it from that."""
        if request.tool_choice not in (None, "none", "auto"):
            raise Miss("not_appendable", "the seeded output is a forced tool call")
        text = self.renderer.decode(output, skip_special_tokens=True)
        if getattr(handler, "parser_cls", None) is None:
            return reply_message(text, None, [])
        # As vLLM's chat handler makes its parser for a request, from public parts: the handler's parser
        # class and model config, and the template arguments the renderer renders the request with.
        parser = handler.parser_cls(
            self.renderer.tokenizer,
            request.tools,
            chat_template_kwargs=self.renderer.online.effective_chat_template_kwargs(request),
            model_config=handler.model_config,
        )
        parser.set_prompt_token_ids(prompt)
        reasoning, content, calls = parser.parse(
            text, request, enable_auto_tools=handler.enable_auto_tools, model_output_token_ids=output
        )
        if calls:
            raise Miss("not_appendable", "the seeded output holds tool calls")
        return reply_message(content, reasoning if request.include_reasoning else None, [])

    async def _render(
        self, base: Prefix | None, messages: list[Message], params: Any, *, generation_prompt: bool
    ) -> str:
        """The text of a conversation from the start of `base`'s chain: the whole render, or for a seeded
        chain the seed's tail followed by what the template renders for the messages after the seed."""
        tail = base.seed_tail if base is not None else None
        if tail is None:
            return await self.renderer.text(messages, params, generation_prompt=generation_prompt)
        return tail + await self._after_history(messages, params, generation_prompt=generation_prompt)

    async def _after_history(self, messages: list[Message], params: Any, *, generation_prompt: bool) -> str:
        """What the template renders for `messages` after a history the plugin does not have: the same
        after each stand-in history, which they leave as it was; otherwise NotAppendable."""
        found: set[str] = set()
        for history in _STAND_INS:
            before = await self.renderer.text(history, params, generation_prompt=False)
            whole = await self.renderer.text(
                [*history, *messages], params, generation_prompt=generation_prompt
            )
            if not whole.startswith(before):
                raise NotAppendable("the template renders the history otherwise when these messages follow")
            found.add(whole[len(before) :])
        if len(found) != 1:
            raise NotAppendable("the template renders these messages otherwise after another history")
        return found.pop()

    async def render_full(self, request: Any) -> Turn | None:
        """The prompt of a request without a reference that asks for a handle, rendered and tokenized as
        vLLM would; None where the plugin steps aside (vLLM then renders it and no handle is made)."""
        model = self.model_of(request)
        identity = self.models.get(model)
        renderer = self.renderer
        request.messages = plain(request.messages)
        if identity is None or (renderer.unsupported or renderer.unsupported_request(request)) is not None:
            return None
        messages = list(request.messages)
        params = renderer.params(request)
        try:
            text = await renderer.text(messages, params, generation_prompt=True)
            ids = await renderer.encode(text, request)
        except Exception:  # vLLM's own render raises the same error in its own words
            return None
        context = renderer.context(model, request.cache_salt, params, request)
        return Turn(model, identity.fingerprint, params, context, None, messages, messages, text, ids)

    # --- after generation -----------------------------------------------------------------------------

    async def register(self, turn: Turn, request: Any, reply: Message) -> dict[str, Any] | None:
        """A handle for the turn, as the reply's `prompt_cache` object; None when no end of the turn is
        a proven cut (or, after a seed, the template renders the reply otherwise after another history)."""
        try:
            return await self._register(turn, request, reply)
        except NotAppendable:
            return None

    async def _register(self, turn: Turn, request: Any, reply: Message) -> dict[str, Any] | None:
        renderer = self.renderer
        low = turn.base.text_length if turn.base else 0
        after = await self._render(turn.base, [*turn.messages, reply], turn.params, generation_prompt=False)
        cut = None
        if after[:low] == turn.text[:low]:
            cut = self._shared_cut(turn.text, after, low)
        if cut is not None and reply.get("reasoning"):
            follower = await self._render(
                turn.base, [*turn.messages, reply, _PROBE], turn.params, generation_prompt=False
            )
            if not follower.startswith(after):
                cut = None
        if cut is not None:
            head = await self._head(turn, cut, request)
            ids = [*head, *await renderer.encode(after[cut:], request)]
            prefix = self._link(turn, [*turn.new_messages, reply], ids, after)
            tokens, covers, shared = prefix.count, True, len(head)
        else:
            before = await self._render(turn.base, turn.messages, turn.params, generation_prompt=False)
            if len(before) < low or not turn.text.startswith(before):
                return None
            try:
                renderer.boundaries.check(turn.text, len(before))
            except NotAppendable:
                return None
            prefix = self._link(turn, turn.new_messages, await self._head(turn, len(before), request), before)
            reply_tokens = (
                await renderer.encode(after[len(before) :], request) if after.startswith(before) else []
            )
            tokens, covers, shared = prefix.count + len(reply_tokens), False, prefix.count
        handle = self.registry.add(
            model=turn.model,
            cache_salt=request.cache_salt,
            context=turn.context,
            fingerprint=turn.fingerprint,
            prefix=prefix,
            shared=shared,
        )
        return {
            "ref": handle.ref,
            "epoch": self.registry.epoch,
            "tokens": tokens,
            "safe_boundary": covers,
            "safe_tokens": prefix.count,
            "prefix_hash": prefix.digest,
            "covers_output": covers,
            "expires_at": handle.expires_at,
            "fingerprint": turn.fingerprint,
            "reused_tokens": turn.base.count if turn.base else 0,
        }

    def _shared_cut(self, text: str, after: str, low: int) -> int | None:
        """The largest position up to which `text` (the prompt) and `after` (the history with the reply)
        agree and at which both can be cut."""
        boundaries = self.renderer.boundaries
        highest = common_prefix_length(text, after, low)
        for _ in range(_MAX_CUTS):
            cut = boundaries.last_cut(text, low, highest)
            if cut is None:
                return None
            try:
                boundaries.check(after, cut)
            except NotAppendable:
                highest = cut - 1
                continue
            return cut
        return None

    async def _head(self, turn: Turn, cut: int, request: Any) -> list[int]:
        """The ids of turn.text[:cut]: a proven cut, so the prompt's ids less those of the rest."""
        rest = await self.renderer.encode(turn.text[cut:], request) if cut < len(turn.text) else []
        return turn.ids[: len(turn.ids) - len(rest)]

    @staticmethod
    def _link(turn: Turn, messages: list[Message], ids: list[int], text: str) -> Prefix:
        base_count = turn.base.count if turn.base else 0
        return extend(turn.base, messages, ids[base_count:], len(text), text_digest(text))
