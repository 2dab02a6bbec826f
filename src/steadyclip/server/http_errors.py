"""Every failure leaves the server as ``{"error": {"type", "message"}}`` with a fitting status.

Bad input is always a 4xx; a 5xx means the server (or its model) is at fault.
"""
from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from steadyclip.errors import (
    ImageTooLargeError,
    InferenceStateError,
    InputError,
    IntegrityError,
    SteadyClipError,
)

_logger = logging.getLogger(__name__)

_STATUS_NAMES = {
    400: "BadRequest", 401: "Unauthorized", 403: "Forbidden", 404: "NotFound", 405: "MethodNotAllowed",
    413: "PayloadTooLarge", 415: "UnsupportedMediaType", 422: "UnprocessableEntity",
    500: "InternalError", 503: "ServiceUnavailable", 504: "Timeout",
}


class ApiError(Exception):
    """An error with an HTTP status, rendered as the standard JSON error body."""

    def __init__(self, status: int, type_: str, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.type = type_
        self.message = message
        self.headers = headers


def error_body(type_: str, message: str) -> dict[str, Any]:
    return {"error": {"type": type_, "message": message}}


def error_response(status: int, type_: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(type_, message), status_code=status, headers=headers)


def from_library_error(e: SteadyClipError) -> ApiError:
    """Map the library's exception tree onto HTTP statuses."""
    name = type(e).__name__
    if isinstance(e, ImageTooLargeError):
        return ApiError(413, name, str(e))
    if isinstance(e, InputError):
        return ApiError(422, name, str(e))
    if isinstance(e, (IntegrityError, InferenceStateError)):
        # The model is no longer the one that was verified: refuse to serve, loudly.
        _logger.error("refusing request: %s: %s", name, e)
        return ApiError(503, name, f"{e} The server refuses to answer with an unverified model.")
    _logger.error("request failed: %s: %s", name, e)
    return ApiError(500, name, str(e))


def install_handlers(app: FastAPI) -> None:
    """Register handlers so no error escapes in FastAPI's default ``{"detail": ...}`` shape."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.type, exc.message, exc.headers)

    @app.exception_handler(SteadyClipError)
    async def _library_error(request: Request, exc: SteadyClipError) -> JSONResponse:
        api = from_library_error(exc)
        return error_response(api.status, api.type, api.message)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        type_ = _STATUS_NAMES.get(exc.status_code, "HTTPError")
        headers = dict(exc.headers) if exc.headers else None
        return error_response(exc.status_code, type_, str(exc.detail), headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(422, "ValidationError", describe_validation_errors(exc.errors()))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        _logger.exception("unexpected error on %s %s", request.method, request.url.path)
        return error_response(500, "InternalError", f"unexpected {type(exc).__name__}; see the server log")


def describe_validation_errors(errors: Any) -> str:
    """Pydantic's error list as one readable line: ``labels.2: Input should be a valid string``."""
    parts = []
    for err in list(errors)[:5]:
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
        parts.append(f"{loc or 'body'}: {err.get('msg', 'invalid')}")
    more = len(list(errors)) - 5
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")
