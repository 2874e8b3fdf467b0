"""The Dockerfile's rules, read with Docker's own parser (no engine runs here, so no image is built): a
build stage makes wheels, the runtime stage installs only them and has no compiler, runs `convstate serve`
in exec form as a numeric non-root user, stops on SIGTERM with the drain period the chart allows for, and
writes nothing to its root filesystem. The .dockerignore keeps the build context to what the image needs."""

from __future__ import annotations

import fnmatch
from functools import cache
from typing import Any

import dockerfile
import yaml

from tests.conftest import repo_root

ROOT = repo_root()
COMPILERS = ("build-essential", "gcc", "g++", "clang", "make ", "cargo", "rustc")


@cache
def stages() -> list[list[Any]]:
    """The Dockerfile's instructions, split by FROM."""
    result: list[list[Any]] = []
    for command in dockerfile.parse_file(str(ROOT / "Dockerfile")):
        if command.cmd == "FROM":
            result.append([])
        if result:
            result[-1].append(command)
    return result


def runtime() -> list[Any]:
    return stages()[-1]


def instructions(stage: list[Any], name: str) -> list[Any]:
    return [command for command in stage if command.cmd == name]


def env(stage: list[Any]) -> dict[str, str]:
    values: dict[str, str] = {}
    for command in instructions(stage, "ENV"):
        pairs = command.value
        values.update(zip(pairs[::2], pairs[1::2], strict=True))
    return values


def chart_values() -> dict[str, Any]:
    values: dict[str, Any] = yaml.safe_load((ROOT / "deploy/helm/convstate/values.yaml").read_text())
    return values


def test_wheels_are_built_in_one_stage_and_installed_without_compilers_in_the_next() -> None:
    assert len(stages()) >= 2
    build, final = stages()[0], runtime()
    assert any("pip wheel" in command.value[0] for command in instructions(build, "RUN"))
    installs = [command for command in instructions(final, "RUN") if "install" in command.value[0]]
    assert installs and all("--no-index" in command.value[0] for command in installs)
    # The admin client ships too: `convstate admin` works inside the container.
    assert any("convstate-client" in command.value[0] for command in installs)
    # The wheels come in through a build mount, so they are not left in a layer of the image.
    assert any(
        flag.startswith("--mount=type=bind,from=build") for command in installs for flag in command.flags
    )
    for command in instructions(final, "RUN"):
        text = command.value[0]
        assert not any(compiler in text for compiler in COMPILERS), text
        assert "apt-get install" not in text, text
    assert instructions(final, "COPY") == [] and instructions(final, "ADD") == []


def test_runs_convstate_serve_in_exec_form_as_a_numeric_non_root_user() -> None:
    (user,) = instructions(runtime(), "USER")
    uid, _, gid = user.value[0].partition(":")
    assert uid.isdigit() and int(uid) > 0 and gid.isdigit() and int(gid) > 0
    (entrypoint,) = instructions(runtime(), "ENTRYPOINT")
    assert entrypoint.json and list(entrypoint.value) == ["convstate", "serve"]
    assert all(command.json for command in instructions(runtime(), "CMD"))
    values = chart_values()
    assert int(uid) == values["podSecurityContext"]["runAsUser"]
    assert int(gid) == values["podSecurityContext"]["runAsGroup"]


def test_stops_on_sigterm_with_the_drain_the_chart_allows_for() -> None:
    (stop,) = instructions(runtime(), "STOPSIGNAL")
    assert stop.value == ("SIGTERM",)
    variables = env(runtime())
    values = chart_values()
    assert int(variables["CONVSTATE_SHUTDOWN_GRACE_SECONDS"]) == values["config"]["shutdownGraceSeconds"]
    assert int(variables["CONVSTATE_WORKERS"]) == values["config"]["workers"]


def test_listens_on_all_interfaces_on_the_exposed_port() -> None:
    variables = env(runtime())
    (expose,) = instructions(runtime(), "EXPOSE")
    assert variables["CONVSTATE_HOST"] == "0.0.0.0"
    assert expose.value == (variables["CONVSTATE_PORT"],)
    assert int(variables["CONVSTATE_PORT"]) == chart_values()["service"]["port"]
    (health,) = instructions(runtime(), "HEALTHCHECK")
    assert "/healthz" in health.original


def test_writes_nothing_to_the_root_filesystem_and_bakes_in_no_secret() -> None:
    variables = env(runtime())
    assert variables["PYTHONDONTWRITEBYTECODE"] == "1"
    assert variables["HOME"] == "/tmp"  # the chart's emptyDir
    for name in variables:
        assert not any(word in name for word in ("PASSWORD", "SECRET", "TOKEN", "DATABASE_URL", "KEY")), name


def _ignored(path: str, patterns: list[str]) -> bool:
    """.dockerignore semantics: a pattern matches a path or any of its parent directories (`**/` at any
    depth); the last matching pattern wins and `!` re-includes."""
    parts = path.split("/")
    # Every directory-or-file path along the way, and each of them relative to every depth (for `**/`).
    spans = [
        "/".join(parts[start:end]) for start in range(len(parts)) for end in range(start + 1, len(parts) + 1)
    ]
    ignored = False
    for pattern in patterns:
        body = pattern.removeprefix("!").rstrip("/")
        anywhere = body.startswith("**/")
        candidates = spans if anywhere else spans[: len(parts)]
        if any(fnmatch.fnmatchcase(span, body.removeprefix("**/")) for span in candidates):
            ignored = not pattern.startswith("!")
    return ignored


def test_dockerignore_sends_only_what_the_build_copies() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    copied = [source for command in instructions(stages()[0], "COPY") for source in command.value[:-1]]
    for source in copied:
        assert not _ignored(source.removeprefix("./"), patterns), source
    for kept_out in (".git/config", ".venv/bin/python", "tests/conftest.py", "convstate.db", ".env"):
        assert _ignored(kept_out, patterns), kept_out
    assert _ignored("service/__pycache__/app.cpython-311.pyc", patterns)
    assert not _ignored("service/backends/reference/tokenizer.json", patterns)
