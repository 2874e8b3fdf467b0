"""Liveness (process up, no I/O) and readiness (database reachable, schema at the migrations' head)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import ORJSONResponse

from service.store.migrate import current_revision, head_revision

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> ORJSONResponse:
    return ORJSONResponse({"status": "ok"})


@router.get("/readyz")
async def readyz(request: Request) -> ORJSONResponse:
    head = head_revision()
    try:
        current = await current_revision(request.app.state.engine)
    except Exception as exc:
        return ORJSONResponse(
            {"status": "unavailable", "database": f"unreachable: {exc.__class__.__name__}"}, 503
        )
    if current != head:
        return ORJSONResponse({"status": "unavailable", "database": f"at {current}, head is {head}"}, 503)
    return ORJSONResponse({"status": "ok", "database": current})
