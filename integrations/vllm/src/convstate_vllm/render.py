"""Rendering a chat request as vLLM's chat handler does, split in the two steps vLLM runs in one: the
chat template to text (`render_messages_async`, tokenize=False), then the text to token ids
(`tokenize_prompt_async` with the request's tokenize parameters, add_special_tokens off by default).

The chat parameters are built as vLLM's `OnlineRenderer.preprocess_chat` builds them (the server's
template, content format and default kwargs, the request's tools unless tool_choice "none" excludes
them); the lane's tests hold every rendered prompt against vLLM's own `/tokenize` of the same history.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

import xxhash
from vllm.renderers.chat_utils import has_non_text_content
from vllm.renderers.hf import HfRenderer
from vllm.renderers.params import merge_kwargs

from convstate_vllm.append import AddedToken, Boundaries
from convstate_vllm.identity import compact

# Template kwargs that decide where the render ends, not what the conversation is: a handle is the same
# prefix whichever of them the next request sets.
_ENDING_KWARGS = frozenset({"add_generation_prompt", "continue_final_message", "tokenize", "return_dict"})


def plain(value: Any) -> Any:
    """Validated chat messages as plain dicts and lists. vLLM validates some content as one-shot
    iterators; a handle renders its messages again on every later turn."""
    if isinstance(value, Mapping):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, str | bytes | int | float | bool) or value is None:
        return value
    if isinstance(value, Iterable):
        return [plain(item) for item in value]
    return value


def _unshared(message: dict[str, Any]) -> dict[str, Any]:
    """A message vLLM's message parser may change: it replaces each tool call's `arguments` string by
    the parsed object in place, and a handle's messages are rendered again on later turns."""
    calls = message.get("tool_calls")
    if not calls:
        return message
    return {
        **message,
        "tool_calls": [{**call, "function": dict(call.get("function") or {})} for call in calls],
    }


class ChatRenderer:
    def __init__(self, online: Any) -> None:
        self.online = online
        self.renderer = online.renderer
        self.model_config = online.model_config
        self.tokenizer = self.renderer.tokenizer
        self.boundaries = Boundaries(self._added_tokens(), has_normalizer=self._has_normalizer())
        self.unsupported = self._unsupported()

    # --- what the plugin can vouch for ----------------------------------------------------------------

    def _unsupported(self) -> str | None:
        """Why this server's prompts cannot be continued from a handle, or None."""
        if type(self.renderer) is not HfRenderer:
            return f"vLLM renders this model with {type(self.renderer).__name__}, not a chat template"
        if self.online.use_harmony:
            return "Harmony (gpt-oss) prompts are not rendered by a chat template"
        if self.model_config.enable_prompt_embeds:
            return "prompt embeddings are enabled"
        if not getattr(self.tokenizer, "is_fast", False) or self._backend() is None:
            return "the tokenizer is not a Hugging Face fast tokenizer"
        return self.boundaries.unproven

    def unsupported_request(self, request: Any) -> str | None:
        """Why this request's prompt cannot be built from a handle, or None. Every reason is a request
        feature whose render or tokenization the append rule does not cover."""
        reasons = {
            "echo": request.echo,
            "continue_final_message": request.continue_final_message,
            "add_generation_prompt false": not request.add_generation_prompt,
            "add_special_tokens": request.add_special_tokens,
            "truncate_prompt_tokens": request.truncate_prompt_tokens is not None,
            "beam search": request.use_beam_search,
            "a request chat template": request.chat_template is not None
            or "chat_template" in (request.chat_template_kwargs or {}),
            "kv_transfer_params": request.kv_transfer_params is not None,
            "return_prompt_text": bool(getattr(request, "return_prompt_text", False)),
            "media content": has_non_text_content(request.messages),
        }
        found = [name for name, present in reasons.items() if present]
        return f"not with {', '.join(found)}" if found else None

    def _backend(self) -> Any:
        return getattr(self.tokenizer, "backend_tokenizer", None)

    def serialized_tokenizer(self) -> str | None:
        backend = self._backend()
        return str(backend.to_str()) if backend is not None else None

    def _added_tokens(self) -> list[AddedToken]:
        decoder = getattr(self.tokenizer, "added_tokens_decoder", None) or {}
        # With split_special_tokens the tokenizer does not cut at its special tokens.
        split_special = bool(getattr(self.tokenizer, "split_special_tokens", False))
        return [
            AddedToken(token.content, bool(token.lstrip), bool(token.single_word), bool(token.normalized))
            for token in decoder.values()
            if not (split_special and token.special)
        ]

    def _has_normalizer(self) -> bool:
        backend = self._backend()
        return backend is None or backend.normalizer is not None

    def templates(self) -> dict[str, Any]:
        """Every template and default a render can take (the `chat_template` fingerprint part)."""
        return {
            "server": self.online.chat_template,
            "tokenizer": getattr(self.tokenizer, "chat_template", None),
            "defaults": self.online.default_chat_template_kwargs,
            "content_format": self.online.chat_template_content_format,
            "exclude_tools_when_tool_choice_none": self.online.exclude_tools_when_tool_choice_none,
        }

    # --- rendering ------------------------------------------------------------------------------------

    def params(self, request: Any) -> Any:
        """The chat parameters of `request`, as OnlineRenderer.preprocess_chat builds them."""
        online = self.online
        tools = None
        if request.tools is not None and not (
            request.tool_choice == "none" and online.exclude_tools_when_tool_choice_none
        ):
            tools = [tool.model_dump() for tool in request.tools]
        defaults = merge_kwargs(online.default_chat_template_kwargs, {"tools": tools, "tokenize": False})
        mm_config = self.model_config.multimodal_config
        return request.build_chat_params(
            online.chat_template, online.chat_template_content_format
        ).with_defaults(
            defaults,
            default_media_io_kwargs=mm_config.media_io_kwargs if mm_config else None,
            default_mm_processor_kwargs=getattr(request, "mm_processor_kwargs", None),
        )

    def context(self, model: str, cache_salt: str | None, params: Any, request: Any) -> str:
        """What a handle must share with a request that continues it, besides the messages: the model,
        the salt, the template and every template kwarg (tools in their key order, reasoning effort,
        documents, ...) and the response format."""
        kwargs = {k: v for k, v in params.chat_template_kwargs.items() if k not in _ENDING_KWARGS}
        response_format = request.response_format
        if hasattr(response_format, "model_dump"):
            response_format = response_format.model_dump(mode="json")
        identity = [model, cache_salt, params.chat_template, sorted(kwargs.items()), response_format]
        # Insertion order: a tool schema with its keys reordered renders differently.
        return xxhash.xxh3_128_hexdigest(compact(identity).encode("utf-8"))

    async def text(self, messages: list[dict[str, Any]], params: Any, *, generation_prompt: bool) -> str:
        kwargs = {**params.chat_template_kwargs, "add_generation_prompt": generation_prompt}
        _, prompt = await self.renderer.render_messages_async(
            [_unshared(message) for message in messages],
            dataclasses.replace(params, chat_template_kwargs=kwargs),
        )
        text: str = prompt["prompt"]
        return text

    async def encode(self, text: str, request: Any) -> list[int]:
        """vLLM's tokenization of `text` for `request`, with its length checks (vLLM's own errors)."""
        prompt = await self.renderer.tokenize_prompt_async(
            {"prompt": text}, request.build_tok_params(self.model_config)
        )
        ids: list[int] = list(prompt["prompt_token_ids"])
        return ids

    def decode(self, ids: list[int], *, skip_special_tokens: bool) -> str:
        """The text of `ids` (the whole text: no spaces cleaned up around punctuation)."""
        text: str = self.tokenizer.decode(
            ids, skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False
        )
        return text

    def is_special(self, token: int) -> bool:
        """A special token (an end of turn, end of text, ...): what ends a reply that ended its message."""
        return token in self.tokenizer.all_special_ids

    def in_vocabulary(self, ids: list[int]) -> bool:
        return not ids or (min(ids) >= 0 and max(ids) < len(self.tokenizer))

    def check_length(self, ids: list[int], request: Any) -> None:
        """vLLM's checks of a whole prompt (raises vLLM's context-length error)."""
        request.build_tok_params(self.model_config).apply_post_tokenization(
            self.tokenizer, {"prompt_token_ids": ids}
        )
