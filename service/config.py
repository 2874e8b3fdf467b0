"""Service settings, read from the environment (prefix CONVSTATE_) or a .env file."""

from __future__ import annotations

import ipaddress
from enum import StrEnum
from functools import cached_property

from pydantic import Field, SecretStr, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from service.domain.policy import BackendMode


class ReseedMode(StrEnum):
    """How a turn continues after its parent's handle failed or is gone (CONVSTATE_RESEED)."""

    ARTIFACT = "artifact"  # from the parent's stored token ids, when the backend takes seeds
    RENDER = "render"  # the whole history, rendered again


class AuthMode(StrEnum):
    API_KEY = "api_key"
    NONE = "none"  # development only: every caller is the admin of the `default` tenant


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CONVSTATE_", env_file=".env", extra="ignore")

    database_url: str = "sqlite+aiosqlite:///./convstate.db"
    # Size the pool to the turns one replica runs at once: a turn beyond it opens and closes a connection,
    # which costs Postgres more than the turn itself.
    db_pool_size: int = Field(40, ge=1)
    db_max_overflow: int = Field(20, ge=0)

    backend_url: str = "http://127.0.0.1:8100"
    backend_mode: BackendMode = BackendMode.FULL
    backend_connect_timeout: float = Field(2.0, gt=0)
    backend_timeout: float = Field(300.0, gt=0, description="read timeout for one backend call")
    backend_retry_attempts: int = Field(3, ge=1, le=10)
    backend_retry_deadline: float = Field(10.0, gt=0, description="total seconds spent retrying")
    backend_max_connections: int = Field(256, ge=1)
    backend_pool_timeout: float = Field(
        5.0, gt=0, description="seconds a request may wait for a free backend connection before a 503"
    )
    backend_info_ttl: float = Field(1.0, gt=0, description="seconds a /v1/models answer is trusted")
    # Sent as a bearer token on every backend call (vLLM's --api-key).
    backend_api_key: SecretStr | None = None

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    # uvicorn worker processes; one per container is the norm (scale with replicas, see operations.md).
    workers: int = Field(1, ge=1, le=64)

    auth: AuthMode = AuthMode.API_KEY
    # auth=none beyond loopback serves every conversation to anyone who can reach the port.
    auth_none_remote: bool = Field(False, validate_default=True)
    # Every replica honours an invalidation (and a key revocation) within this many seconds.
    invalidation_max_lag: float = Field(1.0, gt=0, le=60)

    canary_fraction: float = Field(0.0, ge=0.0, le=1.0)
    response_ttl_days: float = Field(30.0, gt=0)
    # A running turn holds its response row's lease and its conversation's lock for this long past its
    # last heartbeat (one a second): a process that dies frees both within it.
    turn_lease_seconds: float = Field(15.0, ge=3, le=30)
    reaper_interval: float = Field(10.0, gt=0, description="seconds between reaper passes")
    shutdown_grace_seconds: float = Field(30.0, ge=0, description="time in-flight turns get on SIGTERM")
    retention_interval: float = Field(300.0, gt=0, description="seconds between retention passes")
    retention_batch: int = Field(500, ge=1, le=100_000)
    # Token artifacts (raw prompt and output ids per turn, the cold path): kept this long (never longer
    # than their response), queued in process for the writer up to this many turns (then dropped and
    # counted), written this many per transaction.
    token_artifacts: bool = True
    artifact_ttl_days: float = Field(7.0, gt=0)
    artifact_queue_size: int = Field(10_000, ge=1)
    artifact_batch: int = Field(100, ge=1, le=10_000)
    reseed: ReseedMode = ReseedMode.ARTIFACT

    # The replay cache (request-level, for evaluation harnesses): how long an answer is kept, how many and
    # how many bytes of them are kept (oldest out first), how long an identical request waits for the one
    # call already under way, and the lease the process making that call renews (a dead process's claim
    # is taken over after it).
    replay_ttl_seconds: float = Field(7 * 86400.0, gt=0)
    replay_max_entries: int = Field(100_000, ge=1)
    replay_max_bytes: int = Field(1024**3, ge=1)
    replay_wait_seconds: float = Field(120.0, gt=0)
    replay_lease_seconds: float = Field(10.0, ge=1, le=300)
    replay_purge_interval: float = Field(60.0, gt=0, description="seconds between replay-cache purges")

    # A background response created with `stream: true` keeps at most this many of its events (then only
    # its terminal event) for GET /v1/responses/{id}?stream=true, which polls for new ones this often.
    stream_events_max: int = Field(10_000, ge=8, le=1_000_000)
    stream_poll_interval: float = Field(0.2, gt=0, le=10)

    max_request_bytes: int = Field(16 * 1024 * 1024, ge=1024)
    max_input_items: int = Field(2048, ge=1)
    # Browser origins (scheme://host[:port], comma-separated, or *) whose pages may open the Responses
    # WebSocket; empty: only pages served from the host the socket is opened on. Clients that send no
    # Origin (SDKs, servers) are not browsers and are not checked.
    websocket_allowed_origins: str = ""
    # `store: false` responses a WebSocket connection keeps, so `previous_response_id` continues them on
    # that connection (oldest out first; 0: none).
    websocket_cached_responses: int = Field(16, ge=0, le=1024)
    # Chain histories kept in the process for full-path turns (service/domain/histories.py); 0: none.
    history_cache_bytes: int = Field(64 * 1024**2, ge=0)

    log_level: str = "info"
    # FastAPI's native OpenTelemetry spans and metrics per request, sent to the providers the process has
    # (opentelemetry-instrument, FASTAPI_OTEL_AUTO_CONFIGURE). Off: no per-request check for them.
    opentelemetry: bool = False

    @field_validator("database_url")
    @classmethod
    def _known_driver(cls, value: str) -> str:
        try:
            url = make_url(value)
        except ArgumentError as exc:
            raise ValueError(f"not a database URL: {value!r}") from exc
        if url.drivername not in ("sqlite+aiosqlite", "postgresql+asyncpg"):
            raise ValueError(
                f"unsupported driver {url.drivername!r}: use sqlite+aiosqlite:// or postgresql+asyncpg://"
            )
        return value

    @field_validator("backend_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"backend_url must start with http:// or https://, got {value!r}")
        value = value.rstrip("/")
        if value.endswith("/v1"):
            raise ValueError("backend_url is the server's base URL, without /v1")
        return value

    @field_validator("auth_none_remote")
    @classmethod
    def _auth_off_only_on_loopback(cls, value: bool, info: ValidationInfo) -> bool:
        host = info.data.get("host", "")
        if info.data.get("auth") is AuthMode.NONE and not is_loopback(host) and not value:
            raise ValueError(
                f"CONVSTATE_AUTH=none while listening on {host}: listen on loopback, or set "
                "CONVSTATE_AUTH_NONE_REMOTE=true to serve without keys anyway"
            )
        return value

    @field_validator("websocket_allowed_origins")
    @classmethod
    def _origins(cls, value: str) -> str:
        for origin in filter(None, (part.strip() for part in value.split(","))):
            if origin != "*" and not origin.startswith(("http://", "https://")):
                raise ValueError(f"an origin is scheme://host[:port] or *, got {origin!r}")
        return value

    @cached_property
    def websocket_origins(self) -> frozenset[str]:
        return frozenset(
            part.strip().rstrip("/").lower()
            for part in self.websocket_allowed_origins.split(",")
            if part.strip()
        )

    @cached_property
    def database(self) -> URL:
        return make_url(self.database_url)

    @property
    def is_sqlite(self) -> bool:
        return self.database.drivername.startswith("sqlite")


def load_settings(**overrides: object) -> Settings:
    """Settings, or one clear line on stderr and exit status 1: bad configuration fails at start."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(part) for part in first["loc"]) or "settings"
        raise SystemExit(f"convstate: bad configuration: CONVSTATE_{field.upper()}: {first['msg']}") from None
