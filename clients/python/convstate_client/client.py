"""The clients. Each admin endpoint is declared once, as a function that builds the HTTP call; `Client`
runs it and returns the result, `AsyncClient` returns a coroutine of it. Same names, same arguments."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Generic, Literal, ParamSpec, Self, TypeVar, cast, overload
from urllib.parse import quote

import httpx

from convstate_client.types import (
    AppendSafety,
    Artifact,
    CreatedKey,
    Inspection,
    Invalidation,
    Invalidations,
    Key,
    Keys,
    ReplayDeleted,
    ReplayEntries,
    ReplayEntry,
    ReplayImported,
    ReplayStats,
    RetentionRun,
    Stats,
    Tenant,
    Tenants,
)

P = ParamSpec("P")
T = TypeVar("T")

Scope = Literal["response", "conversation", "tenant", "model", "fingerprint", "all"]


class ApiError(Exception):
    """An error answer, with the fields of OpenAI's envelope."""

    def __init__(self, status: int, body: Mapping[str, Any]) -> None:
        found = body.get("error")
        error: Mapping[str, Any] = found if isinstance(found, Mapping) else {}
        self.status = status
        self.message: str = str(error.get("message", "")) or f"HTTP {status}"
        self.type: str | None = error.get("type")
        self.param: str | None = error.get("param")
        self.code: str | None = error.get("code")
        super().__init__(f"{status} {self.code or self.type}: {self.message}")


@dataclass(frozen=True, slots=True)
class Decision:
    """How convstate sent a turn to the backend (the `x-convstate-decision` header)."""

    path: str  # full | cache_ref | affinity
    reason: str  # hit, no_parent, invalidated, fingerprint_mismatch:cache_salt, backend_miss:expired, ...

    @property
    def reused(self) -> bool:
        return self.path != "full"


def decision(headers: Mapping[str, str]) -> Decision | None:
    """The decision of a turn from its response headers (an SDK raw response's `.headers`)."""
    value = headers.get("x-convstate-decision")
    if not value:
        return None
    path, _, reason = value.partition(";")
    return Decision(path.strip(), reason.strip().removeprefix("reason="))


@dataclass(frozen=True, slots=True)
class Call(Generic[T]):
    """One HTTP call and, as its type parameter, what it answers."""

    method: str
    path: str
    json: dict[str, Any] | None = None
    params: dict[str, Any] = field(default_factory=dict)


def _segment(value: str) -> str:
    return quote(value, safe="")


def _query(**values: Any) -> dict[str, Any]:
    return {name: value for name, value in values.items() if value is not None}


def _tenants() -> Call[Tenants]:
    return Call("GET", "/admin/v1/tenants")


def _tenant(tenant: str) -> Call[Tenant]:
    return Call("GET", f"/admin/v1/tenants/{_segment(tenant)}")


def _create_tenant(tenant: str, response_ttl_days: float | None = None) -> Call[Tenant]:
    return Call("POST", "/admin/v1/tenants", {"id": tenant, "response_ttl_days": response_ttl_days})


def _set_retention(tenant: str, response_ttl_days: float | None) -> Call[Tenant]:
    """Days new responses of the tenant live; None: the service default."""
    return Call("POST", f"/admin/v1/tenants/{_segment(tenant)}", {"response_ttl_days": response_ttl_days})


def _rotate_salt(tenant: str, reason: str) -> Call[Tenant]:
    """A new cache salt: every handle of the tenant stops being reused."""
    return Call("POST", f"/admin/v1/tenants/{_segment(tenant)}/rotate_salt", {"reason": reason})


def _keys(tenant: str | None = None) -> Call[Keys]:
    return Call("GET", "/admin/v1/keys", params=_query(tenant=tenant))


def _create_key(tenant: str, role: Literal["user", "admin"] = "user", name: str = "") -> Call[CreatedKey]:
    """A new key; its secret (`key`) is in this answer only."""
    return Call("POST", "/admin/v1/keys", {"tenant": tenant, "role": role, "name": name})


def _revoke_key(key_id: str, reason: str) -> Call[Key]:
    return Call("POST", f"/admin/v1/keys/{_segment(key_id)}/revoke", {"reason": reason})


def _lineage(response_id: str) -> Call[Inspection]:
    """The response and its ancestors, turn by turn: decision, prefix record, handle state."""
    return Call("GET", f"/admin/v1/responses/{_segment(response_id)}/lineage")


def _conversation_turns(conversation_id: str) -> Call[Inspection]:
    return Call("GET", f"/admin/v1/conversations/{_segment(conversation_id)}/turns")


def _artifact(response_id: str, context: int = 16) -> Call[Artifact]:
    """A turn's token artifact: its prompt and output ids, and where its prompt leaves its parent's
    prompt + output ids, with `context` ids on each side as text."""
    return Call("GET", f"/admin/v1/responses/{_segment(response_id)}/artifact", params={"context": context})


def _append_safety(model: str | None = None) -> Call[AppendSafety]:
    """Observed append-safety per model and template."""
    return Call("GET", "/admin/v1/append_safety", params=_query(model=model))


def _invalidate(
    scope: Scope, key: str | None = None, *, reason: str, part: str | None = None
) -> Call[Invalidation]:
    """Invalidate every handle in the scope (a response and its descendants, a conversation, a tenant, a
    model, a fingerprint or one of its parts, or all): one row, honoured by every replica within a second."""
    return Call(
        "POST", "/admin/v1/invalidations", {"scope": scope, "key": key, "part": part, "reason": reason}
    )


def _invalidations(limit: int = 100, before: int | None = None) -> Call[Invalidations]:
    """The audit log, newest first."""
    return Call("GET", "/admin/v1/invalidations", params=_query(limit=limit, before=before))


def _stats(tenant: str | None = None, model: str | None = None, since: float | None = None) -> Call[Stats]:
    return Call("GET", "/admin/v1/stats", params=_query(tenant=tenant, model=model, since=since))


def _run_retention() -> Call[RetentionRun]:
    return Call("POST", "/admin/v1/retention/run")


def _set_replay_cache(tenant: str, enabled: bool) -> Call[Tenant]:
    """Whether the tenant's requests use the replay cache by default."""
    return Call("POST", f"/admin/v1/tenants/{_segment(tenant)}", {"replay_cache": enabled})


def _replay_stats(
    tenant: str | None = None,
    model: str | None = None,
    key_prefix: str | None = None,
    older_than: float | None = None,
) -> Call[ReplayStats]:
    """Replay-cache entries and bytes per tenant and model."""
    params = _query(tenant=tenant, model=model, key_prefix=key_prefix, older_than=older_than)
    return Call("GET", "/admin/v1/replay/stats", params=params)


def _replay_entries(
    tenant: str | None = None,
    model: str | None = None,
    key_prefix: str | None = None,
    older_than: float | None = None,
    *,
    limit: int = 100,
    after: str | None = None,
    whole: bool = False,
) -> Call[ReplayEntries]:
    """A page of replay-cache entries, oldest first (`next` continues); `whole` adds each one's request and
    reply, as an export."""
    params = _query(
        tenant=tenant, model=model, key_prefix=key_prefix, older_than=older_than, limit=limit, after=after
    )
    return Call("GET", "/admin/v1/replay/entries", params={**params, "whole": whole})


def _replay_delete(
    tenant: str | None = None,
    model: str | None = None,
    key_prefix: str | None = None,
    older_than: float | None = None,
    *,
    all: bool = False,
) -> Call[ReplayDeleted]:
    """Delete the selected replay-cache entries; every entry only with `all=True`."""
    body = _query(tenant=tenant, model=model, key_prefix=key_prefix, older_than=older_than)
    return Call("POST", "/admin/v1/replay/delete", {**body, "all": all})


def _replay_import(entries: list[ReplayEntry]) -> Call[ReplayImported]:
    """Entries as exported (up to 1,000 a call)."""
    return Call("POST", "/admin/v1/replay/import", {"entries": entries})


class _Endpoint(Generic[P, T]):
    """Turns a call builder into a method: synchronous on `Client`, a coroutine on `AsyncClient`."""

    def __init__(self, build: Callable[P, Call[T]]) -> None:
        self._build = build
        self.__doc__ = build.__doc__

    @overload
    def __get__(self, client: Client, owner: type[Any]) -> Callable[P, T]: ...

    @overload
    def __get__(self, client: AsyncClient, owner: type[Any]) -> Callable[P, Awaitable[T]]: ...

    def __get__(self, client: Client | AsyncClient, owner: type[Any]) -> Callable[P, Any]:
        build = self._build

        def method(*args: P.args, **kwargs: P.kwargs) -> Any:
            return client._send(build(*args, **kwargs))

        method.__doc__ = self.__doc__
        return method


class _AdminApi:
    tenants = _Endpoint(_tenants)
    tenant = _Endpoint(_tenant)
    create_tenant = _Endpoint(_create_tenant)
    set_retention = _Endpoint(_set_retention)
    rotate_salt = _Endpoint(_rotate_salt)
    keys = _Endpoint(_keys)
    create_key = _Endpoint(_create_key)
    revoke_key = _Endpoint(_revoke_key)
    lineage = _Endpoint(_lineage)
    conversation_turns = _Endpoint(_conversation_turns)
    artifact = _Endpoint(_artifact)
    append_safety = _Endpoint(_append_safety)
    invalidate = _Endpoint(_invalidate)
    invalidations = _Endpoint(_invalidations)
    stats = _Endpoint(_stats)
    run_retention = _Endpoint(_run_retention)
    set_replay_cache = _Endpoint(_set_replay_cache)
    replay_stats = _Endpoint(_replay_stats)
    replay_entries = _Endpoint(_replay_entries)
    replay_delete = _Endpoint(_replay_delete)
    replay_import = _Endpoint(_replay_import)


def _headers(api_key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {api_key}"}


def _result(call: Call[T], reply: httpx.Response) -> T:
    if reply.status_code >= 400:
        try:
            body = reply.json()
        except ValueError:
            body = {}
        raise ApiError(reply.status_code, body if isinstance(body, Mapping) else {})
    return cast(T, reply.json())


class Client(_AdminApi):
    """Synchronous: `Client(base_url, api_key)`; use as a context manager or call `close()`."""

    def __init__(self, base_url: str, api_key: str, *, timeout: float = 30.0) -> None:
        self._http = httpx.Client(base_url=base_url.rstrip("/"), headers=_headers(api_key), timeout=timeout)

    def _send(self, call: Call[T]) -> T:
        reply = self._http.request(call.method, call.path, json=call.json, params=call.params)
        return _result(call, reply)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class AsyncClient(_AdminApi):
    """Asynchronous: the same methods, as coroutines; `async with` or `await aclose()`."""

    def __init__(self, base_url: str, api_key: str, *, timeout: float = 30.0) -> None:
        self._http = httpx.AsyncClient(
            base_url=base_url.rstrip("/"), headers=_headers(api_key), timeout=timeout
        )

    async def _send(self, call: Call[T]) -> T:
        reply = await self._http.request(call.method, call.path, json=call.json, params=call.params)
        return _result(call, reply)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()
