"""Bad configuration fails at start with one line naming the variable."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from service.config import AuthMode, Settings


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("CONVSTATE_BACKEND_MODE", "bogus"),
        ("CONVSTATE_DATABASE_URL", "mysql://somewhere/db"),
        ("CONVSTATE_BACKEND_URL", "http://vllm:8000/v1"),
        ("CONVSTATE_PORT", "99999"),
        ("CONVSTATE_WEBSOCKET_ALLOWED_ORIGINS", "app.example"),
    ],
)
def test_bad_setting_is_one_clear_line(variable: str, value: str) -> None:
    env = {**os.environ, variable: value}
    _one_clear_line(env, variable)


def test_no_auth_beyond_loopback_is_refused_unless_forced() -> None:
    env = {**os.environ, "CONVSTATE_AUTH": "none", "CONVSTATE_HOST": "0.0.0.0"}
    _one_clear_line(env, "CONVSTATE_AUTH_NONE_REMOTE")
    assert Settings(auth=AuthMode.NONE, host="::1").auth is AuthMode.NONE
    assert Settings(auth=AuthMode.NONE, host="0.0.0.0", auth_none_remote=True).host == "0.0.0.0"


def _one_clear_line(env: dict[str, str], variable: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "service.cli", "serve"], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"convstate: bad configuration: {variable}:"), lines
