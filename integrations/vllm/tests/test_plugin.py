"""The entry point: the supported vLLM range and the settings it reads."""

from __future__ import annotations

import pytest
import vllm

from convstate_vllm.plugin import PromptCachePlugin, _setting


def test_the_installed_vllm_is_supported() -> None:
    plugin = PromptCachePlugin()
    assert plugin.name == "convstate" and plugin.required_tasks == ("generate",)


@pytest.mark.parametrize("version", ["0.31.2", "0.33.0", "1.0.0"])
def test_another_vllm_is_refused(monkeypatch: pytest.MonkeyPatch, version: str) -> None:
    monkeypatch.setattr(vllm, "__version__", version)
    with pytest.raises(RuntimeError, match="supports vLLM"):
        PromptCachePlugin()


def test_settings() -> None:
    assert _setting({}, "CONVSTATE_VLLM_MAX_HANDLES", 1024, int) == 1024
    assert _setting({"CONVSTATE_VLLM_HANDLE_TTL": "2.5"}, "CONVSTATE_VLLM_HANDLE_TTL", 600, float) == 2.5
    for bad in ("0", "-3", "many"):
        with pytest.raises(ValueError, match="CONVSTATE_VLLM_MAX_HANDLES"):
            _setting({"CONVSTATE_VLLM_MAX_HANDLES": bad}, "CONVSTATE_VLLM_MAX_HANDLES", 1024, int)
