"""Every failure leaves the server as ``{"error": {"type", "message"}}`` with a fitting status.

On the OpenAI-compatible routes (:data:`OPENAI_PATHS`) the body is OpenAI's
``{"error": {"message", "type", "param", "code"}}`` instead (``code`` is
steadyclip's error type), so the ``openai`` client raises its usual exceptions
with our message. Bad input is always a 4xx; a 5xx means the server (or its
model) is at fault; 429 means busy, retry after ``Retry-After`` seconds.
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
    413: "PayloadTooLarge", 415: "UnsupportedMediaType", 422: "UnprocessableEntity", 429: "Overloaded",
    500: "InternalError", 503: "ServiceUnavailable", 504: "Timeout",
}


class ApiError(Exception):
    """An error with an HTTP status, rendered as the standard JSON error body."""

    def __init__(self, status: int, type_: str, message: str, *, headers: dict[str, str] | None = None,
                 param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.type = type_
        self.message = message
        self.headers = headers
        self.param = param  # the request field at fault, for OpenAI-shaped errors


#: Routes that answer in OpenAI's shapes, errors included.
OPENAI_PATHS = ("/v1/embeddings", "/v1/models")


def is_openai_path(path: str) -> bool:
    return any(path == p or path.startswith(p + "/") for p in OPENAI_PATHS)


def error_body(type_: str, message: str) -> dict[str, Any]:
    return {"error": {"type": type_, "message": message}}


def openai_error_body(status: int, type_: str, message: str, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error object: ``type`` is its category, ``code`` steadyclip's error type."""
    category = ("authentication_error" if status == 401 else "rate_limit_error" if status == 429
                else "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": category, "param": param, "code": type_}}


def error_doc(path: str, status: int, type_: str, message: str, param: str | None = None) -> dict[str, Any]:
    """The error body the route at ``path`` speaks."""
    if is_openai_path(path):
        return openai_error_body(status, type_, message, param)
    return error_body(type_, message)


def error_response(status: int, type_: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(type_, message), status_code=status, headers=headers)


def render_error(request: Request, status: int, type_: str, message: str,
                 headers: dict[str, str] | None = None, param: str | None = None) -> JSONResponse:
    return JSONResponse(error_doc(request.url.path, status, type_, message, param), status_code=status,
                        headers=headers)


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
        return render_error(request, exc.status, exc.type, exc.message, exc.headers, exc.param)

    @app.exception_handler(SteadyClipError)
    async def _library_error(request: Request, exc: SteadyClipError) -> JSONResponse:
        api = from_library_error(exc)
        if isinstance(exc, (IntegrityError, InferenceStateError)):
            service = getattr(request.app.state, "service", None)
            if service is not None:
                service.integrity_failures += 1
        return render_error(request, api.status, api.type, api.message)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        type_ = _STATUS_NAMES.get(exc.status_code, "HTTPError")
        headers = dict(exc.headers) if exc.headers else None
        return render_error(request, exc.status_code, type_, str(exc.detail), headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return render_error(request, 422, "ValidationError", describe_validation_errors(exc.errors()))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        _logger.exception("unexpected error on %s %s", request.method, request.url.path)
        return render_error(request, 500, "InternalError", f"unexpected {type(exc).__name__}; see the server log")


def describe_validation_errors(errors: Any) -> str:
    """Pydantic's error list as one readable line: ``labels.2: Input should be a valid string``."""
    parts = []
    for err in list(errors)[:5]:
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
        parts.append(f"{loc or 'body'}: {err.get('msg', 'invalid')}")
    more = len(list(errors)) - 5
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")
