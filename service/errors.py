"""Typed errors every layer may raise; the API layer renders them in OpenAI's error envelope."""

from __future__ import annotations


class ConvstateError(Exception):
    status = 500
    type = "server_error"
    # Seconds a client should wait before retrying, sent as Retry-After; None for errors a retry won't fix.
    retry_after: int | None = None

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


class RequestTooLarge(ConvstateError):
    status = 413
    type = "invalid_request_error"

    def __init__(self, limit: int) -> None:
        super().__init__(f"The request body is larger than {limit} bytes.", code="request_too_large")


class NotFound(ConvstateError):
    status = 404
    type = "invalid_request_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = "not_found") -> None:
        super().__init__(message, param=param, code=code)


class Conflict(ConvstateError):
    status = 409
    type = "invalid_request_error"


class ServiceUnavailable(ConvstateError):
    """A dependency is down or saturated (the database, the backend's connection pool), or this replica
    is shutting down: 503, retry later."""

    status = 503
    type = "server_error"
    retry_after = 1

    def __init__(self, message: str, *, code: str = "service_unavailable") -> None:
        super().__init__(message, code=code)


class LeaseLost(ConvstateError):
    """A running turn's response row or conversation lock is no longer its own: the response was
    cancelled, or reaped after the database was unreachable for a whole lease."""

    def __init__(self) -> None:
        super().__init__("The response was finalized before it could finish.", code="server_error")


class BackendUnavailable(ConvstateError):
    """The backend could not be reached or kept failing (502), or said it is overloaded (503)."""

    status = 502
    type = "server_error"

    def __init__(self, message: str, *, status: int = 502, code: str = "backend_unavailable") -> None:
        super().__init__(message, code=code)
        self.status = status
        if status == 503:
            self.retry_after = ServiceUnavailable.retry_after


class BackendTimeout(ConvstateError):
    status = 504
    type = "server_error"

    def __init__(self, message: str) -> None:
        super().__init__(message, code="backend_timeout")


class Unauthorized(ConvstateError):
    """No API key, or one that is unknown or revoked."""

    status = 401
    type = "invalid_request_error"


class Forbidden(ConvstateError):
    """A valid key whose role may not do this (a user key on the admin API)."""

    status = 403
    type = "invalid_request_error"
