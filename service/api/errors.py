"""OpenAI's error envelope for every failure: {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.api.json import JSONBody
from service.errors import ConvstateError

log = logging.getLogger("convstate.api")


def envelope(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(
    status: int, message: str, type_: str, param: str | None = None, code: str | None = None
) -> JSONBody:
    return JSONBody(envelope(message, type_, param, code), status_code=status)


def _param(loc: tuple[Any, ...]) -> str | None:
    path = [part for part in loc if part not in ("body", "query", "path")]
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or None


def validation_param(exc: RequestValidationError | ValidationError) -> str | None:
    return _param(tuple(exc.errors()[0].get("loc", ())))


def validation_message(exc: RequestValidationError | ValidationError) -> str:
    """The first problem, naming the field: "Invalid value for 'temperature': ..."."""
    message = str(exc.errors()[0].get("msg", "Invalid request"))
    param = validation_param(exc)
    return f"Invalid value for '{param}': {message}" if param else message


def install(app: FastAPI) -> None:
    @app.exception_handler(ConvstateError)
    async def _convstate_error(_request: Request, exc: ConvstateError) -> JSONBody:
        return error_response(exc.status, exc.message, exc.type, exc.param, exc.code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONBody:
        if exc.errors()[0].get("type") == "json_invalid":
            return error_response(
                400, "We could not parse the JSON body of your request.", "invalid_request_error"
            )
        return error_response(
            400, validation_message(exc), "invalid_request_error", validation_param(exc), "invalid_value"
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONBody:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return error_response(exc.status_code, str(exc.detail), kind)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONBody:
        log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return error_response(500, "The server had an error while processing your request.", "server_error")
