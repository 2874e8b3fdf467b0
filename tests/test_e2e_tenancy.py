"""Tenants apart, over real HTTP: a second tenant's key gets 404 for every id of the first on every route
(the walk covers every route of the app, so a new route must be added here, scoped), no key gets 401, a
user key gets 403 on the admin API, a revoked key is refused by every replica within a second, and
authentication adds no SQL to a turn."""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import orjson
import pytest
from fastapi.routing import APIRoute
from starlette.routing import BaseRoute, Route, WebSocketRoute
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from service.app import create_app
from tests.conftest import Credentials, Service, new_tenant, sql_statements, start_service

MODEL = "ref-chatml"
# Routes anyone may call: probes, metrics, the API's own description.
PUBLIC = {"/healthz", "/readyz", "/metrics", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}


@dataclass(frozen=True, slots=True)
class Ids:
    response: str
    conversation: str
    item: str
    key: str
    tenant: str
    prefix: str


@dataclass(frozen=True, slots=True)
class Probe:
    body: dict[str, Any] | None
    status: int  # what another tenant's user key gets
    code: str | None = None


def _owned(service: Service) -> Ids:
    """Objects of the service's tenant: a response, a conversation with an item, a key."""
    client = service.openai()
    response = client.responses.create(model=MODEL, input="mine")
    conversation = client.conversations.create(items=[{"role": "user", "content": "private"}])
    item = client.conversations.items.list(conversation.id).data[0].id
    assert item is not None
    key = service.admin().keys(service.tenant)["data"][0]["id"]
    prefix = f"mine-{uuid.uuid4().hex[:8]}"
    with service.http() as http:
        http.post(
            "/v1/prefixes", json={"name": prefix, "model": MODEL, "instructions": "Mine."}
        ).raise_for_status()
    return Ids(response.id, conversation.id, item, key, service.tenant, prefix)


def _probes(ids: Ids) -> dict[tuple[str, str], list[Probe]]:
    """Every (method, route) of the app and what a second tenant's user key gets with the first's ids."""
    previous = {"model": MODEL, "input": "x", "previous_response_id": ids.response}
    not_found = [Probe(None, 404)]
    items = {"items": [{"role": "user", "content": "x"}]}
    admin = [Probe({"reason": "r", "scope": "all"}, 403, "admin_required")]
    return {
        ("POST", "/v1/responses"): [
            Probe(previous, 400, "previous_response_not_found"),
            Probe({"model": MODEL, "input": "x", "conversation": ids.conversation}, 404),
            Probe({"model": MODEL, "input": "x", "convstate_prefix": ids.prefix}, 400, "prefix_not_found"),
        ],
        ("WS", "/v1/responses"): [
            Probe(previous, 400, "previous_response_not_found"),
            Probe({"model": MODEL, "input": "x", "conversation": ids.conversation}, 404),
        ],
        ("GET", "/v1/responses/{response_id}"): not_found,
        ("DELETE", "/v1/responses/{response_id}"): not_found,
        ("POST", "/v1/responses/{response_id}/cancel"): not_found,
        ("GET", "/v1/responses/{response_id}/input_items"): not_found,
        ("POST", "/v1/responses/compact"): [
            Probe({"model": MODEL, "previous_response_id": ids.response}, 400, "previous_response_not_found")
        ],
        # Takes no id: creates the caller's own conversation.
        ("POST", "/v1/conversations"): [Probe(items, 200)],
        ("GET", "/v1/conversations/{conversation_id}"): not_found,
        ("POST", "/v1/conversations/{conversation_id}"): [Probe({"metadata": {}}, 404)],
        ("DELETE", "/v1/conversations/{conversation_id}"): not_found,
        ("GET", "/v1/conversations/{conversation_id}/items"): not_found,
        ("POST", "/v1/conversations/{conversation_id}/items"): [Probe(items, 404)],
        ("GET", "/v1/conversations/{conversation_id}/items/{item_id}"): not_found,
        ("DELETE", "/v1/conversations/{conversation_id}/items/{item_id}"): not_found,
        # Take no id; their replay-cache entries are the caller's own (tests/test_e2e_replay.py).
        ("POST", "/v1/chat/completions"): [
            Probe({"model": MODEL, "messages": [{"role": "user", "content": "x"}]}, 200)
        ],
        ("POST", "/v1/completions"): [Probe({"model": MODEL, "prompt": "x"}, 200)],
        # Registers the caller's own prefix; naming the first tenant's is refused like an unknown one.
        ("POST", "/v1/prefixes"): [Probe({"name": "theirs", "model": MODEL, "instructions": "Theirs."}, 200)],
        ("GET", "/v1/prefixes"): [Probe(None, 200)],
        ("GET", "/v1/prefixes/{name}"): not_found,
        ("DELETE", "/v1/prefixes/{name}"): not_found,
        **{
            route: admin
            for route in [
                ("GET", "/admin/v1/tenants"),
                ("POST", "/admin/v1/tenants"),
                ("GET", "/admin/v1/tenants/{tenant_id}"),
                ("POST", "/admin/v1/tenants/{tenant_id}"),
                ("POST", "/admin/v1/tenants/{tenant_id}/rotate_salt"),
                ("GET", "/admin/v1/keys"),
                ("POST", "/admin/v1/keys"),
                ("POST", "/admin/v1/keys/{key_id}/revoke"),
                ("GET", "/admin/v1/responses/{response_id}/lineage"),
                ("GET", "/admin/v1/responses/{response_id}/artifact"),
                ("GET", "/admin/v1/append_safety"),
                ("GET", "/admin/v1/conversations/{conversation_id}/turns"),
                ("POST", "/admin/v1/invalidations"),
                ("GET", "/admin/v1/invalidations"),
                ("GET", "/admin/v1/stats"),
                ("POST", "/admin/v1/retention/run"),
                ("GET", "/admin/v1/replay/stats"),
                ("GET", "/admin/v1/replay/entries"),
                ("POST", "/admin/v1/replay/delete"),
                ("POST", "/admin/v1/replay/import"),
            ]
        },
    }


def _leaves(routes: list[BaseRoute]) -> list[BaseRoute]:
    """Routes, with included routers opened (FastAPI keeps an included router as one route)."""
    found: list[BaseRoute] = []
    for route in routes:
        inner = getattr(route, "original_router", None)
        found += _leaves(inner.routes) if inner is not None else [route]
    return found


def _routes(service: Service) -> set[tuple[str, str]]:
    app = create_app(service.settings)
    routes: set[tuple[str, str]] = set()
    for route in _leaves(app.routes):
        if isinstance(route, Route) and route.path in PUBLIC:
            continue
        if isinstance(route, APIRoute):
            routes |= {(method, route.path) for method in route.methods or ()}
        elif isinstance(route, WebSocketRoute):
            routes.add(("WS", route.path))
        else:
            routes.add(("ANY", getattr(route, "path", "")))
    return {route for route in routes if route[1] not in PUBLIC}


def _fill(path: str, ids: Ids) -> str:
    values = {
        "response_id": ids.response,
        "conversation_id": ids.conversation,
        "item_id": ids.item,
        "key_id": ids.key,
        "tenant_id": ids.tenant,
        "name": ids.prefix,
    }
    return re.sub(r"\{(\w+)\}", lambda match: values[match.group(1)], path)


def _envelope(body: Mapping[str, Any]) -> dict[str, Any]:
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    error: dict[str, Any] = body["error"]
    return error


def _socket(service: Service, key: str | None, frame: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """(status, error) of one response.create frame over the WebSocket mode; a refused handshake gives the
    HTTP status and envelope."""
    headers = {"authorization": f"Bearer {key}"} if key else {}
    url = service.url.replace("http://", "ws://") + "/v1/responses"
    try:
        with connect(url, additional_headers=headers, open_timeout=10) as socket:
            socket.send(orjson.dumps({"type": "response.create", **frame}).decode())
            while True:
                event = orjson.loads(socket.recv(timeout=30))
                if event["type"] == "error":
                    return int(event["status"]), event["error"]
                if event["type"] in ("response.completed", "response.failed"):
                    return 200, {}
    except InvalidStatus as refused:
        return refused.response.status_code, _envelope(orjson.loads(refused.response.body or b"{}"))


def _call(
    service: Service, key: str | None, route: tuple[str, str], probe: Probe, ids: Ids
) -> tuple[int, Any]:
    method, path = route
    if method == "WS":
        return _socket(service, key, probe.body or {})
    headers = {"authorization": f"Bearer {key}"} if key else {}
    with httpx.Client(base_url=service.url, timeout=30, headers=headers) as http:
        reply = http.request(method, _fill(path, ids), json=probe.body)
    body = reply.json()
    return reply.status_code, _envelope(body) if reply.status_code >= 400 else body


@pytest.fixture(scope="module")
def walk(service_factory: Any) -> tuple[Service, Ids, Credentials]:
    service: Service = service_factory()
    return service, _owned(service), new_tenant(service.settings.database_url)


def test_every_route_is_walked(walk: tuple[Service, Ids, Credentials]) -> None:
    service, ids, _ = walk
    assert _routes(service) == set(_probes(ids)), "a new route needs its probe here (and its tenant scoping)"


def test_another_tenant_gets_404_for_every_id_on_every_route(walk: tuple[Service, Ids, Credentials]) -> None:
    service, ids, other = walk
    for route, probes in _probes(ids).items():
        for probe in probes:
            status, body = _call(service, other.user_key, route, probe, ids)
            assert status == probe.status, (route, probe, body)
            if probe.code is not None:
                assert body["code"] == probe.code, (route, body)
    # The owner still has all of it.
    owner = service.openai()
    assert owner.responses.retrieve(ids.response).status == "completed"
    assert [item.id for item in owner.conversations.items.list(ids.conversation)] == [ids.item]


@pytest.mark.parametrize("key", [None, "sk-cs-not-a-key"])
def test_no_key_or_a_wrong_one_is_401_on_every_route(
    walk: tuple[Service, Ids, Credentials], key: str | None
) -> None:
    service, ids, _ = walk
    expected = "invalid_api_key" if key else "missing_api_key"
    for route, probes in _probes(ids).items():
        status, body = _call(service, key, route, probes[0], ids)
        assert (status, body["code"]) == (401, expected), (route, body)
        assert "sk-cs-" not in body["message"]


def test_public_routes_need_no_key(service: Service) -> None:
    for path in ("/healthz", "/readyz", "/metrics", "/openapi.json"):
        assert httpx.get(service.url + path, timeout=30).status_code == 200, path


def test_the_sdk_sees_openai_errors(service: Service) -> None:
    with pytest.raises(openai.AuthenticationError) as refused:
        service.openai("sk-cs-wrong").responses.create(model=MODEL, input="x")
    assert refused.value.code == "invalid_api_key"


def test_revoked_key_is_refused_by_another_replica_within_a_second(
    migrated_urls: dict[str, str], reference_backend: Any
) -> None:
    first = start_service(migrated_urls["postgres"], reference_backend.url)
    second = start_service(migrated_urls["postgres"], reference_backend.url)
    try:
        key = first.admin().create_key(first.tenant, "user", "short-lived")
        assert second.openai(key["key"]).conversations.create().id  # cached by the second replica now
        first.admin().revoke_key(key["id"], "leaked")
        revoked = time.monotonic()
        while True:
            with second.http(key["key"]) as http:
                status = http.post("/v1/conversations", json={}).status_code
            if status == 401:
                break
            assert status == 200 and time.monotonic() - revoked < 1.0, "revocation not honoured within 1 s"
            time.sleep(0.02)
        assert first.admin().invalidations(limit=1)["data"][0]["scope"] == "api_key"
    finally:
        first.server.stop()
        second.server.stop()


def test_authentication_adds_no_sql_to_a_turn(service_factory: Any) -> None:
    counts: dict[str, list[int]] = {}
    for auth in ("api_key", "none"):
        service: Service = service_factory("postgres", backend_mode="cache_ref", auth=auth)
        client = service.openai()
        previous = None
        counts[auth] = []
        for turn in range(6):
            raw = client.responses.with_raw_response.create(
                model=MODEL, input=f"turn {turn}", previous_response_id=previous
            )
            previous = raw.parse().id
            counts[auth].append(sql_statements(raw.headers))
    # The first turn may read the tenant (and, with keys, the key) once per process.
    assert counts["api_key"][1:] == counts["none"][1:], counts
    assert len(set(counts["api_key"][2:])) == 1
