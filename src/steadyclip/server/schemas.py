"""Request and response shapes: pydantic models for JSON bodies and the OpenAPI document.

Responses are built as plain dicts (the same documents ``steadyclip classify
--json`` and ``steadyclip embed --json`` print); the response models here only
describe them in ``/openapi.json``.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

_WARN_HELP = "what the image decoders warned about: {index, source, message} per message"
_B64_HELP = "base64 image bytes (PNG, JPEG, WebP, ...), optionally as a data: URL"


class ClassifyJSON(BaseModel):
    """``POST /v1/classify`` with ``Content-Type: application/json``."""

    model_config = ConfigDict(extra="forbid")

    image: str | None = Field(None, description=_B64_HELP)
    images: list[str] | None = Field(None, description="several images, each " + _B64_HELP)
    names: list[str] | None = Field(None, description="optional names echoed back as each result's 'source'")
    labels: list[str] = Field(..., description='class labels, e.g. ["red circle", "blue square"]')
    templates: str | list[str] | None = Field(
        None, description="built-in template set name ('photo', 'openai-imagenet') or a list of templates "
        "each containing '{}' once; default 'photo'")
    top_k: int = Field(3, description="how many top labels to list (all probabilities are always returned)")


class EmbedJSON(BaseModel):
    """``POST /v1/embed`` with ``Content-Type: application/json``."""

    model_config = ConfigDict(extra="forbid")

    images: list[str] = Field(default_factory=list, description="each " + _B64_HELP)
    names: list[str] | None = Field(None, description="optional names echoed back as each image's 'source'")
    texts: list[str] = Field(default_factory=list, description="texts to embed")
    encoding: Literal["float", "base64"] = Field(
        "float", description="'float': lists of numbers; 'base64': little-endian float32 bytes, base64")


class ErrorDetail(BaseModel):
    type: str = Field(..., description="error class, e.g. LabelError, ImageDecodeError, PayloadTooLarge")
    message: str = Field(..., description="what happened and what to do")


class ErrorResponse(BaseModel):
    error: ErrorDetail


class TopLabel(BaseModel):
    label: str
    prob: float


class ClassifyResult(BaseModel):
    source: str | None
    top: list[TopLabel]
    probs: dict[str, float] = Field(..., description="probability of every label, in request order")


class ClassifyResponse(BaseModel):
    results: list[ClassifyResult]
    provenance: dict[str, Any] = Field(..., description="weights hash, fingerprint, profile, threads, versions...")
    errors: int = Field(0, description="always 0: a bad image fails the whole request with a 4xx")
    warnings: list[dict[str, Any]] = Field(default_factory=list, description=_WARN_HELP)


class EmbedResponse(BaseModel):
    images: list[dict[str, Any]]
    texts: list[dict[str, Any]]
    provenance: dict[str, Any]
    warnings: list[dict[str, Any]] = Field(default_factory=list, description=_WARN_HELP)


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": what}
    for code, what in {
        400: "malformed body (bad JSON, bad multipart)",
        401: "missing or wrong bearer token",
        413: "body or image too large",
        415: "unsupported Content-Type",
        429: "overloaded: retry after the Retry-After seconds",
        422: "invalid labels, texts, templates, top_k or undecodable image",
        503: "not ready, or the model failed an integrity check",
        504: "request took longer than the server's timeout",
    }.items()
}
