"""Typed errors every layer may raise; the API layer renders them in OpenAI's error envelope."""

from __future__ import annotations


class ConvstateError(Exception):
    status = 500
    type = "server_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


class InvalidRequest(ConvstateError):
    status = 400
    type = "invalid_request_error"


class ContextLengthExceeded(InvalidRequest):
    """The prompt does not fit the backend's context window."""

    def __init__(self, message: str) -> None:
        super().__init__(message, param="input", code="context_length_exceeded")


class NotFound(ConvstateError):
    status = 404
    type = "invalid_request_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = "not_found") -> None:
        super().__init__(message, param=param, code=code)


class Conflict(ConvstateError):
    status = 409
    type = "invalid_request_error"


class BackendUnavailable(ConvstateError):
    """The backend could not be reached or kept failing (502/503)."""

    status = 502
    type = "server_error"

    def __init__(self, message: str, *, status: int = 502, code: str = "backend_unavailable") -> None:
        super().__init__(message, code=code)
        self.status = status


class BackendTimeout(ConvstateError):
    status = 504
    type = "server_error"

    def __init__(self, message: str) -> None:
        super().__init__(message, code="backend_timeout")
