"""OpenAI's error envelope for every failure: {"error": {"message", "type", "param", "code"}}, and its
place in /openapi.json."""

from __future__ import annotations

import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.api.body import dotted
from service.api.json import JSONBody
from service.errors import ConvstateError, InvalidRequest

log = logging.getLogger("convstate.api")


def envelope(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(
    status: int, message: str, type_: str, param: str | None = None, code: str | None = None
) -> JSONBody:
    return JSONBody(envelope(message, type_, param, code), status_code=status)


def convstate_error_response(exc: ConvstateError) -> JSONBody:
    response = error_response(exc.status, exc.message, exc.type, exc.param, exc.code)
    if exc.retry_after is not None:
        response.headers["retry-after"] = str(exc.retry_after)
    return response


# Pydantic names the member of a union a value failed in its location ("tool_choice", "NamedToolChoice",
# "name"); the client's field is "tool_choice.name". Request fields are lowercase, so these never clash.
_UNION_MEMBER = re.compile(
    r"[A-Z]\w*|str|int|float|bool|none|constrained-\w+|(list|dict|literal|function-\w+)\[.*\]"
)


def _located(error: Any) -> tuple[str | int, ...]:
    return tuple(
        part
        for part in error.get("loc", ())
        if part not in ("body", "query", "path")
        and not (isinstance(part, str) and _UNION_MEMBER.fullmatch(part))
    )


# OpenAI's codes for a number out of its range, by pydantic's error type; integer or decimal as the
# bound is (float fields declare float bounds).
_RANGE_CODES = {
    "greater_than_equal": ("below_min_value", ">="),
    "greater_than": ("below_min_value", ">"),
    "less_than_equal": ("above_max_value", "<="),
    "less_than": ("above_max_value", "<"),
}


def validation_error(exc: RequestValidationError | ValidationError) -> InvalidRequest:
    """The problem to report, as OpenAI words it. Of a union's failed members, the one that got furthest
    into the value (for {"type": "function", "name": 5}, the name, not "not a string")."""
    error = max(exc.errors(), key=lambda error: len(_located(error)))
    param = dotted(_located(error))
    kind = str(error.get("type"))
    if kind == "extra_forbidden":
        return InvalidRequest(f"Unknown parameter: '{param}'.", param=param, code="unknown_parameter")
    if kind in _RANGE_CODES and len(bounds := list((error.get("ctx") or {}).values())) == 1:
        what, relation = _RANGE_CODES[kind]
        code = ("decimal_" if isinstance(bounds[0], float) else "integer_") + what
        return InvalidRequest(
            f"Invalid '{param}': {code.replace('_', ' ')}. Expected a value {relation} {bounds[0]}, "
            f"but got {error.get('input')} instead.",
            param=param,
            code=code,
        )
    message = str(error.get("msg", "Invalid request"))
    return InvalidRequest(
        f"Invalid value for '{param}': {message}" if param else message, param=param, code="invalid_value"
    )


def install(app: FastAPI) -> None:
    @app.exception_handler(ConvstateError)
    async def _convstate_error(_request: Request, exc: ConvstateError) -> JSONBody:
        return convstate_error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONBody:
        return convstate_error_response(validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONBody:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return error_response(exc.status_code, str(exc.detail), kind)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONBody:
        log.exception(
            "unhandled error on %s %s",
            request.method,
            request.url.path,
            exc_info=exc,
            extra={"request_id": request.state.request_id},
        )
        return error_response(500, "The server had an error while processing your request.", "server_error")

    app.openapi = lambda: _openapi_without_422(app)  # type: ignore[method-assign]


# --- /openapi.json ------------------------------------------------------------------------------------


class ErrorDetail(BaseModel):
    model_config = ConfigDict(extra="forbid")
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(BaseModel):
    """OpenAI's error envelope."""

    model_config = ConfigDict(extra="forbid")
    error: ErrorDetail


_ERRORS = {
    400: "Invalid request: the envelope's `param` names the field",
    401: "No API key, or an unknown or revoked one (`Authorization: Bearer <key>`)",
    403: "The key's role may not use this endpoint: the admin API needs an admin key",
    404: "No such object for this tenant",
    409: "The object's state does not allow the operation",
    413: "The request body is larger than CONVSTATE_MAX_REQUEST_BYTES",
    500: "An unexpected server error",
    502: "The model backend failed or could not be reached",
    503: "The database or the model backend is unavailable or saturated; retry after Retry-After seconds",
    504: "The model backend did not answer in time",
}
_RETRY_AFTER = {
    "Retry-After": {
        "description": "Seconds to wait before retrying",
        "required": True,
        "schema": {"type": "integer"},
    }
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The `responses` of a route or router: each status with the envelope as its body."""
    documented: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        documented[status] = {"model": ErrorBody, "description": _ERRORS[status]}
        if status == 503:
            documented[status]["headers"] = _RETRY_AFTER
    return documented


def _openapi_without_422(app: FastAPI) -> dict[str, Any]:
    """FastAPI documents a 422 for every route that takes parameters; this service answers 400 (in the
    envelope) instead, so the 422 and its schemas are dropped."""
    schema = app.openapi_schema
    if schema is None:
        schema = FastAPI.openapi(app)  # builds and caches app.openapi_schema
        for path in schema["paths"].values():
            for operation in path.values():
                operation.get("responses", {}).pop("422", None)
        for name in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(name, None)
    return schema
