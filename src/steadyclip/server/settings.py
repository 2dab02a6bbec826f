"""Server settings: every limit in one frozen dataclass, with the reason for its default."""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, replace
from typing import Any

from steadyclip.errors import InputError

TOKEN_ENV = "STEADYCLIP_TOKEN"


@dataclass(frozen=True)
class ServerSettings:
    """Limits and behaviour of the HTTP server.

    Attributes:
        token: bearer token required on ``/v1/*`` (``None``: no auth; keep the server on loopback then).
        max_body_bytes: request body cap, checked on Content-Length *and* on the bytes streamed in.
        max_images: images per request; bigger jobs belong to ``steadyclip batch``.
        max_labels: labels per classify request (each is a text-tower forward on a cache miss).
        max_texts: texts per embed request.
        max_text_chars: characters per label/text; the tokenizer truncates far earlier anyway.
        max_templates: explicit prompt templates per request (``openai-imagenet`` has 80).
        max_top_k: largest ``top_k`` accepted.
        max_pixels: decoded-pixel cap per image (``None``: the library default); bombs get 413.
        request_timeout_s: a request that takes longer gets 504 (its queued work is cancelled).
        batch_wait_ms: how long the batcher waits for companions before running a partial micro-batch.
        max_queue: queued engine jobs before new requests get 503 + Retry-After.
        decode_concurrency: images decoded at once (thread pool); bounds memory when big uploads pile up.
        allowed_url_hosts: hosts (``name`` or ``name:port``) whose image URLs ``/v1/embeddings`` may fetch;
            empty (the default): URLs are refused, only data URIs are read (server-side request forgery).
    """

    token: str | None = None
    max_body_bytes: int = 16 * 1024 * 1024
    max_images: int = 16
    max_labels: int = 256
    max_texts: int = 256
    max_text_chars: int = 1000
    max_templates: int = 128
    max_top_k: int = 1000
    max_pixels: int | None = None
    request_timeout_s: float = 30.0
    batch_wait_ms: float = 5.0
    max_queue: int = 1024
    decode_concurrency: int = 4
    allowed_url_hosts: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_images", "max_labels", "max_texts", "max_text_chars",
                     "max_templates", "max_top_k", "max_queue", "decode_concurrency"):
            if getattr(self, name) < 1:
                raise InputError(f"ServerSettings.{name} must be >= 1, got {getattr(self, name)!r}; give a positive limit")
        if self.request_timeout_s <= 0 or self.batch_wait_ms < 0:
            raise InputError(
                f"request_timeout_s must be > 0 and batch_wait_ms >= 0, got {self.request_timeout_s!r}, "
                f"{self.batch_wait_ms!r}; give a positive timeout and a non-negative wait"
            )
        if any(not isinstance(h, str) or not h.strip() or "/" in h for h in self.allowed_url_hosts):
            raise InputError(f"allowed_url_hosts must be host names (or host:port), got {self.allowed_url_hosts!r}; "
                             "give bare names such as 'images.example.com', without a scheme or path")
        object.__setattr__(self, "allowed_url_hosts", tuple(h.strip().lower() for h in self.allowed_url_hosts))
        if self.token is not None and not self.token.strip():
            raise InputError("the bearer token is blank; give a real secret or no token at all")

    @classmethod
    def from_env(cls, **overrides: Any) -> ServerSettings:
        """Settings with the token taken from ``$STEADYCLIP_TOKEN`` unless given explicitly."""
        settings = cls(**overrides)
        if settings.token is None and os.environ.get(TOKEN_ENV):
            settings = replace(settings, token=os.environ[TOKEN_ENV])
        return settings

    def public_dict(self) -> dict[str, Any]:
        """The limits as clients may see them (the token is reduced to whether one is set)."""
        doc = asdict(self)
        doc["auth"] = "bearer" if doc.pop("token") else "none"
        return doc
