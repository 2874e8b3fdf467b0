"""What a served model runs under, as the extension's discovery reports it: the fingerprint parts taken
from vLLM's real model, tokenizer and chat template, and the fingerprint that hashes them.

`revision` must identify the weights, never name a path (a path can be reloaded with other weights). In
order: `CONVSTATE_VLLM_REVISION` (an operator's statement, e.g. an image digest), a commit given to
`--revision`, the commit of a Hugging Face cache snapshot the weights were loaded from, or a digest of
the weight files' contents (up to `CONVSTATE_VLLM_HASH_MAX_BYTES`). Failing all of them it is null,
which convstate reads as unknown: it then never reuses a handle for the model.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import xxhash

log = logging.getLogger("vllm.plugins.convstate")

_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_CHUNK = 1 << 22


def compact(value: Any) -> str:
    """JSON without whitespace, non-ASCII kept, keys in insertion order (as `| tojson` renders them)."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=repr)


def canonical(value: Any) -> str:
    """`compact` with sorted keys: the encoding identities are hashed in."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=repr)


def fingerprint(parts: Mapping[str, Any]) -> str:
    return xxhash.xxh3_128_hexdigest(canonical(dict(parts)).encode("utf-8"))


def weight_files(folder: Path) -> list[Path]:
    return sorted(path for path in folder.rglob("*") if path.is_file() and path.suffix in _WEIGHT_SUFFIXES)


def files_digest(paths: Iterable[Path], root: Path) -> str:
    """xxh3-128 over each file's path below `root` and contents, in sorted order."""
    hasher = xxhash.xxh3_128()
    for path in sorted(paths):
        hasher.update(str(path.relative_to(root)).encode("utf-8") + b"\0")
        with path.open("rb") as handle:
            while chunk := handle.read(_CHUNK):
                hasher.update(chunk)
    return hasher.hexdigest()


def resolve_revision(
    model: str, revision: str | None, environ: Mapping[str, str], *, max_bytes: int | None = None
) -> str | None:
    declared = environ.get("CONVSTATE_VLLM_REVISION")
    if declared:
        return declared
    if revision and _COMMIT.match(revision):
        return revision
    folder = Path(model)
    if not folder.is_dir():
        return _hub_commit(model, revision)
    resolved = folder.resolve()
    if resolved.parent.name == "snapshots" and _COMMIT.match(resolved.name):
        return resolved.name
    files = weight_files(resolved)
    limit = (
        max_bytes if max_bytes is not None else int(environ.get("CONVSTATE_VLLM_HASH_MAX_BYTES", 16 << 30))
    )
    size = sum(path.stat().st_size for path in files)
    if not files or size > limit:
        log.warning(
            "convstate: no revision for %s (%d bytes of weights; the limit is %d): set "
            "CONVSTATE_VLLM_REVISION, or convstate will not reuse handles for this model",
            model,
            size,
            limit,
        )
        return None
    return "xxh3-128:" + files_digest(files, resolved)


def _hub_commit(repo: str, revision: str | None) -> str | None:
    """The commit of the cached snapshot a hub model was loaded from, without a network call."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - vLLM depends on huggingface_hub
        return None
    found = try_to_load_from_cache(repo, "config.json", revision=revision)
    if not isinstance(found, str):
        return None
    snapshot = Path(found).parent
    return snapshot.name if _COMMIT.match(snapshot.name) else None


def tokenizer_digest(serialized: str) -> str:
    return xxhash.xxh3_128_hexdigest(serialized.encode("utf-8"))


def template_digest(templates: Mapping[str, Any]) -> str:
    """The chat templates a render can use (the server's, the tokenizer's named ones), the server's
    default template kwargs and the content format: all of them decide the rendered text."""
    return xxhash.xxh3_128_hexdigest(canonical(dict(templates)).encode("utf-8"))
