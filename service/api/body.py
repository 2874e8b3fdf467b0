"""What a request may carry, checked once at the edge, before any schema, store or backend sees it.

JSON is valid far beyond what the rest of the service can take: Postgres rejects NUL (U+0000) in text and
JSON, orjson (every stored row and backend body) rejects lone surrogates, integers outside 64 bits and
nesting deeper than 255, and NaN or Infinity would silently become null. Each of those would otherwise
fail late, as a 500, sometimes after the backend already generated. One pass over the parsed body (and
over path and query parameters) turns them into a 400 naming the field.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute

from service.errors import InvalidRequest

# Deep enough for any JSON schema a tool or response format needs; documented in docs/api.md.
MAX_DEPTH = 64
INT_MIN, INT_MAX = -(2**63), 2**63 - 1
_SURROGATE = re.compile("[\ud800-\udfff]")


class _Rejected(Exception):
    """A bad value; `path` collects its location, innermost first, as the recursion unwinds."""

    def __init__(self, problem: str) -> None:
        super().__init__(problem)
        self.problem = problem
        self.path: list[str | int] = []


def _text_problem(text: str) -> str | None:
    if "\x00" in text:
        return "NUL characters (\\u0000) are not allowed"
    if not text.isascii() and _SURROGATE.search(text):
        return "lone surrogates (\\ud800-\\udfff) are not allowed; send valid UTF-16 pairs"
    return None


def _walk(value: Any, depth: int) -> None:
    if isinstance(value, str):
        if problem := _text_problem(value):
            raise _Rejected(problem)
    elif isinstance(value, (dict, list)):
        if depth > MAX_DEPTH:
            raise _Rejected(f"JSON may be nested at most {MAX_DEPTH} levels deep")
        for key, item in value.items() if isinstance(value, dict) else enumerate(value):
            if isinstance(key, str) and (problem := _text_problem(key)):
                # The key itself is unprintable: name the object that holds it.
                raise _Rejected(f"an object key is invalid: {problem}")
            try:
                _walk(item, depth + 1)
            except _Rejected as rejected:
                rejected.path.append(key)
                raise
    elif isinstance(value, bool):
        return
    elif isinstance(value, int):
        if not INT_MIN <= value <= INT_MAX:
            raise _Rejected("integers must fit in 64 bits")
    elif isinstance(value, float) and not math.isfinite(value):
        raise _Rejected("numbers must be finite")


def dotted(path: list[str | int] | tuple[str | int, ...]) -> str | None:
    """`input[0].content` from ("input", 0, "content"): the `param` of OpenAI's error envelope."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or None


def check_json(value: Any) -> None:
    """Raise InvalidRequest naming the first value no downstream serializer or database accepts."""
    try:
        _walk(value, 1)
    except _Rejected as rejected:
        param = dotted(rejected.path[::-1])
        where = f" for '{param}'" if param else ""
        raise InvalidRequest(
            f"Invalid value{where}: {rejected.problem}.", param=param, code="invalid_value"
        ) from None


def parse_json(raw: bytes | str) -> Any:
    """A request body or WebSocket frame, parsed and checked."""
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):
        # JSONDecodeError, undecodable bytes, and nesting too deep for the parser itself.
        raise InvalidRequest("We could not parse the JSON body of your request.") from None
    check_json(value)
    return value


def _check_parameters(request: Request) -> None:
    for name, value in (*request.path_params.items(), *request.query_params.multi_items()):
        if isinstance(value, str) and (problem := _text_problem(value)):
            raise InvalidRequest(f"Invalid value for '{name}': {problem}.", param=name, code="invalid_value")


class _CheckedRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_checked_json"):
            self._checked_json = parse_json(await self.body())
        return self._checked_json


async def checked_request(request: Request) -> Request:
    """The request with its path and query checked and its JSON body, if any, parsed and checked, once:
    `request.json()` then returns it without parsing again."""
    request = _CheckedRequest(request.scope, request.receive)
    _check_parameters(request)
    if await request.body():
        await request.json()
    return request


class CheckedRoute(APIRoute):
    """A route whose path, query and JSON body are checked before FastAPI validates them against the
    route's schema. The body is parsed here, once (FastAPI reads it back through `request.json()`), so
    that its errors reach the app's error handlers as they are: inside FastAPI's own body parsing, any
    of them (and a 413 from the size limit) would become a bare 400."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def checked(request: Request) -> Response:
            return await handler(await checked_request(request))

        return checked
