"""Settings of the reference backend (env prefix CONVSTATE_REF_)."""

from __future__ import annotations

from pydantic import field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

PROFILES = ("chatml", "reasoning-trim", "system-once")


class ReferenceSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CONVSTATE_REF_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = 8100
    # Comma list of `served-name=profile`; every model shares the one tokenizer.
    models: str = "ref-chatml=chatml,ref-reasoning-trim=reasoning-trim,ref-system-once=system-once"
    max_model_len: int = 32768
    handle_ttl_seconds: float = 600
    max_handles: int = 100_000
    block_size: int = 16
    # Bound of the simulated automatic prefix cache, in blocks.
    prefix_cache_blocks: int = 262_144
    # Simulated prefill cost per non-cached prompt token, in microseconds (0 = off).
    prefill_us_per_token: float = 0.0
    stream_chunk_tokens: int = 4
    # False: continue from any live handle without checking that the request's fingerprint, salt and
    # render context match the handle's, as a backend that trusts its caller would; each such reuse is
    # counted as stale. The differential tests run against this to check the service's decision alone.
    verify_handles: bool = True
    # Require this bearer token on /v1 paths, as vLLM's --api-key does.
    api_key: str | None = None

    @field_validator("models")
    @classmethod
    def _check_models(cls, value: str) -> str:
        parse_models(value)
        return value

    @field_validator(
        "block_size", "stream_chunk_tokens", "max_handles", "max_model_len", "prefix_cache_blocks"
    )
    @classmethod
    def _positive(cls, value: int) -> int:
        if value <= 0:
            raise ValueError("must be positive")
        return value

    def model_profiles(self) -> dict[str, str]:
        return parse_models(self.models)


def parse_models(spec: str) -> dict[str, str]:
    """`a=chatml,b=system-once` -> {"a": "chatml", "b": "system-once"}, in order."""
    result: dict[str, str] = {}
    for item in spec.split(","):
        name, sep, profile = item.strip().partition("=")
        name, profile = name.strip(), profile.strip()
        if not sep or not name or profile not in PROFILES:
            raise ValueError(f"bad model entry {item!r}: expected name=profile, profile one of {PROFILES}")
        if name in result:
            raise ValueError(f"model {name!r} listed twice")
        result[name] = profile
    return result
