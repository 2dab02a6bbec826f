"""ASGI middleware in front of the app: bearer-token check, then the request-body cap.

Both run before any route reads a byte of the body. The body cap is enforced
twice: on a declared Content-Length (rejected unread) and on the bytes actually
streamed in (chunked uploads, or a client that lies about its length).
"""
from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from starlette.datastructures import Headers

from steadyclip.server.http_errors import ApiError, error_doc

_logger = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

PROTECTED_PREFIX = "/v1/"


def body_too_large(limit: int, seen: int | None = None) -> ApiError:
    got = f" ({seen} bytes)" if seen is not None else ""
    return ApiError(
        413, "PayloadTooLarge",
        f"request body{got} exceeds the server's limit of {limit} bytes; send fewer or smaller images "
        "(or start the server with a larger --max-body-mb)",
    )


class GateMiddleware:
    """Bearer auth on ``/v1/*`` (constant-time compare) and a hard cap on body size."""

    def __init__(self, app: ASGIApp, *, token: str | None, max_body_bytes: int) -> None:
        self.app = app
        self._token = token.encode() if token else None
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        path = str(scope["path"])
        protected = self._token is not None and scope["path"].startswith(PROTECTED_PREFIX)
        if protected and not self._authorised(headers.get("authorization", "")):
            await _send_json(send, 401, error_doc(
                path, 401, "Unauthorized",
                "missing or wrong bearer token: send the header 'Authorization: Bearer <token>' with the "
                "token the server was started with (--token or $STEADYCLIP_TOKEN)",
            ), {"www-authenticate": "Bearer"})
            return
        declared = headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                await _send_json(send, 400, error_doc(path, 400, "BadRequest",
                                                      f"Content-Length {declared!r} is not a number"))
                return
            if int(declared) > self.max_body_bytes:
                err = body_too_large(self.max_body_bytes, int(declared))
                await _send_json(send, err.status, error_doc(path, err.status, err.type, err.message))
                return

        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise body_too_large(self.max_body_bytes)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except ApiError as e:  # raised while reading the body outside a route's handlers
            if started:
                raise
            await _send_json(send, e.status, error_doc(path, e.status, e.type, e.message))

    def _authorised(self, header: str) -> bool:
        assert self._token is not None
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "bearer":
            return False
        # compare_digest takes the same time wherever the first differing byte is.
        return hmac.compare_digest(value.strip().encode(), self._token)


async def _send_json(send: Send, status: int, doc: dict[str, Any], extra: dict[str, str] | None = None) -> None:
    body = json.dumps(doc).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.encode(), v.encode()) for k, v in (extra or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
