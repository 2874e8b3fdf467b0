"""vLLM's real renderer for SmolLM2-135M-Instruct (tokenizer, chat template), built the way vLLM's API
server builds it, without an engine. The model folder is named by CONVSTATE_VLLM_MODEL_DIR (convstate's
`make test-vllm` builds it and sets it); without it these tests fail, they never skip."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from vllm.engine.arg_utils import EngineArgs
from vllm.renderers.online_renderer import OnlineRenderer
from vllm.renderers.registry import renderer_from_config

from plugin_support import template


@pytest.fixture(scope="session")
def vllm_renderer() -> Any:
    folder = os.environ.get("CONVSTATE_VLLM_MODEL_DIR")
    if not folder or not (Path(folder) / "tokenizer.json").is_file():
        pytest.fail("CONVSTATE_VLLM_MODEL_DIR must name the SmolLM2 model folder: run `make test-vllm`")
    config = EngineArgs(model=folder, max_model_len=8192).create_engine_config()
    return renderer_from_config(config)


@pytest.fixture(scope="session")
def online(vllm_renderer: Any) -> Callable[[str], Any]:
    """vLLM's OnlineRenderer with a template of tests/templates (or the model's own, `smollm2`)."""
    made: dict[str, Any] = {}

    def get(name: str) -> Any:
        if name not in made:
            made[name] = OnlineRenderer(
                vllm_renderer.model_config,
                vllm_renderer,
                request_logger=None,
                chat_template=template(name),
                chat_template_content_format="auto",
            )
        return made[name]

    return get
