"""Liveness (process up, no I/O), readiness (database reachable, schema at or past this code's head) and
Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service import metrics
from service.api.json import JSONBody
from service.store.db import connections_in_use
from service.store.migrate import behind_head, current_revision, head_revision

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> JSONBody:
    return JSONBody({"status": "ok"})


@router.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
async def prometheus_metrics(request: Request) -> Response:
    metrics.db_pool_checked_out.set(connections_in_use(request.app.state.engine))
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


@router.get("/readyz", responses={503: {"description": "The database is unreachable or not at head"}})
async def readyz(request: Request) -> JSONBody:
    """Ready while not draining and the database answers at or past this code's head. The backend's state
    is reported, never fails readiness: a backend restart would otherwise take every replica out of
    rotation at once, and reads, deletes and conversations need no backend (turns answer 502/503 on their
    own meanwhile)."""
    if not request.app.state.pipeline.accepting:
        return JSONBody({"status": "unavailable", "reason": "shutting down"}, 503)
    backend = await request.app.state.pipeline.backend.status()
    head = head_revision()
    try:
        current = await current_revision(request.app.state.engine)
    except Exception as exc:
        database, ready = f"unreachable: {exc.__class__.__name__}", False
    else:
        ready = not behind_head(current)
        database = str(current) if ready else f"at {current}, head is {head}"
    return JSONBody(
        {"status": "ok" if ready else "unavailable", "database": database, "backend": backend},
        200 if ready else 503,
    )
