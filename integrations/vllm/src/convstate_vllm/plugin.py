"""The entry point vLLM loads (`vllm.endpoint_plugins`, enabled by `VLLM_PLUGINS=convstate`).

Settings come from the environment of the vLLM process (vLLM's command line belongs to vLLM):

- `CONVSTATE_VLLM_HANDLE_TTL` (seconds, default 600): how long a handle is valid after it is made.
- `CONVSTATE_VLLM_MAX_HANDLES` (default 1024): handles kept per API-server process, least recently
  used out first.
- `CONVSTATE_VLLM_REVISION`, `CONVSTATE_VLLM_HASH_MAX_BYTES`: see convstate_vllm.identity.
"""

from __future__ import annotations

import asyncio
import logging
import os
from argparse import Namespace
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from convstate_vllm import SUPPORTED_VLLM, __version__

log = logging.getLogger("vllm.plugins.convstate")


def _setting(environ: Mapping[str, str], name: str, default: float, kind: type[int] | type[float]) -> Any:
    raw = environ.get(name)
    if raw is None:
        return kind(default)
    try:
        value = kind(raw)
    except ValueError:
        value = 0
    if value <= 0:
        raise ValueError(f"{name} must be a positive {kind.__name__}, not {raw!r}")
    return value


class PromptCachePlugin:
    name = "convstate"
    required_tasks: tuple[str, ...] | None = ("generate",)

    def __init__(self) -> None:
        import vllm

        installed = Version(vllm.__version__)
        if not SpecifierSet(SUPPORTED_VLLM).contains(Version(installed.base_version), prereleases=True):
            raise RuntimeError(
                f"convstate-vllm {__version__} supports vLLM {SUPPORTED_VLLM}, not {vllm.__version__}: "
                "the server runs without the prompt_cache extension"
            )
        self.vllm_version = vllm.__version__

    def attach_router(self, app: FastAPI) -> None:
        from convstate_vllm.routes import router

        app.include_router(router)

    async def init_state(self, engine_client: Any, state: Any, args: Namespace) -> None:
        if engine_client is None:  # a render-only server: nothing to generate from
            return
        from convstate_vllm.cache import ModelIdentity, PromptCache
        from convstate_vllm.handles import Registry
        from convstate_vllm.identity import fingerprint, resolve_revision, template_digest, tokenizer_digest
        from convstate_vllm.render import ChatRenderer
        from convstate_vllm.routes import STATE_KEY

        environ = os.environ
        registry = Registry(
            capacity=_setting(environ, "CONVSTATE_VLLM_MAX_HANDLES", 1024, int),
            ttl=_setting(environ, "CONVSTATE_VLLM_HANDLE_TTL", 600.0, float),
        )
        renderer = ChatRenderer(state.online_renderer)
        model_config = engine_client.model_config
        revision = await asyncio.to_thread(
            resolve_revision, model_config.model, model_config.revision, environ
        )
        serialized = renderer.serialized_tokenizer()
        names = [path.name for path in state.openai_serving_models.base_model_paths]
        models = {}
        for name in names:
            parts = {
                "model": name,
                "revision": revision,
                "tokenizer": tokenizer_digest(serialized) if serialized is not None else None,
                "renderer": f"convstate-vllm/{__version__} vllm/{self.vllm_version}",
                "chat_template": template_digest(renderer.templates()),
                "lora": None,
                "block_size": engine_client.vllm_config.cache_config.block_size,
            }
            models[name] = ModelIdentity(parts, fingerprint(parts))
        setattr(state, STATE_KEY, PromptCache(renderer, models, names[0], registry))
        if renderer.unsupported is not None:
            log.warning("convstate: prompt_cache disabled for this server: %s", renderer.unsupported)
        else:
            log.info(
                "convstate: prompt_cache for %s (epoch %s, revision %s, %d handles of %.0f s)",
                ", ".join(names),
                registry.epoch,
                revision,
                registry.capacity,
                registry.ttl,
            )
