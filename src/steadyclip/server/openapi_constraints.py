"""The request schemas in ``/openapi.json``, with every constraint the server enforces.

Built from the server's :class:`ServerSettings` and the served model, so the
limits published are the limits applied (item counts, text lengths, ``top_k``
range, the model id, the embedding width). The rule: a request valid under
this schema is accepted. Where a rule cannot be said in JSON Schema exactly,
the schema says something *stricter* (labels without surrounding whitespace,
so uniqueness is plain ``uniqueItems``; ``image`` or ``images``, not both).
Image strings carry a ``format`` (``image-base64``, ``image-data-uri``): their
bytes must decode to an image, which no pattern can say.
"""
from __future__ import annotations

from typing import Any

from steadyclip.engine.prompts import BUILTIN_TEMPLATE_SETS
from steadyclip.server.settings import ServerSettings

ENCODINGS = ("float", "base64")
MODALITIES = ("text", "image")

_B64 = r"(?:(?:[A-Za-z0-9+/]{4})+(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?|[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)"
#: A base64 ``data:`` URI of an image (what ``/v1/embeddings`` takes with ``"modality": "image"``).
DATA_URI_PATTERN = r"^data:image/[A-Za-z0-9.+-]+;base64," + _B64 + "$"
#: Bare base64, or a data URI (what ``/v1/classify`` and ``/v1/embed`` take).
BASE64_IMAGE_PATTERN = r"^(?:data:image/[A-Za-z0-9.+-]+;base64,)?" + _B64 + "$"
_NO_SURROUNDING_SPACE = r"^\S(?:[\s\S]*\S)?$"


def image_string(fmt: str = "image-base64") -> dict[str, Any]:
    pattern = DATA_URI_PATTERN if fmt == "image-data-uri" else BASE64_IMAGE_PATTERN
    return {"type": "string", "format": fmt, "pattern": pattern, "contentEncoding": "base64",
            "contentMediaType": "image/*",
            "description": "base64 bytes of a PNG, JPEG, WebP, ... file" +
                           (" as a data: URI" if fmt == "image-data-uri" else ", optionally as a data: URI")}


def _array(items: dict[str, Any], lo: int, hi: int, **extra: Any) -> dict[str, Any]:
    return {"type": "array", "items": items, "minItems": lo, "maxItems": hi, **extra}


def _text(s: ServerSettings, **extra: Any) -> dict[str, Any]:
    return {"type": "string", "maxLength": s.max_text_chars, **extra}


def _names_match(count_field: str, s: ServerSettings) -> list[dict[str, Any]]:
    """``names`` has as many entries as ``count_field`` (one branch per length)."""
    return [{"required": ["names", count_field],
             "properties": {count_field: {"minItems": k, "maxItems": k}, "names": {"minItems": k, "maxItems": k}}}
            for k in range(1, s.max_images + 1)]


def classify_json(s: ServerSettings) -> dict[str, Any]:
    label = _text(s, minLength=1, pattern=_NO_SURROUNDING_SPACE)
    template = _text(s, pattern=r"^[^{}]*\{\}[^{}]*$", description="contains '{}' exactly once")
    props = {
        "image": image_string(), "images": _array(image_string(), 1, s.max_images),
        "names": _array({"type": "string"}, 1, s.max_images, description="echoed back as each result's 'source'"),
        "labels": _array(label, 1, s.max_labels, uniqueItems=True),
        "templates": {"anyOf": [{"type": "string", "enum": list(BUILTIN_TEMPLATE_SETS)},
                                _array(template, 1, s.max_templates)]},
        "top_k": {"type": "integer", "minimum": 1, "maximum": s.max_top_k, "default": 3},
    }
    names = [{"not": {"required": ["names"]}},
             {"required": ["names", "image"], "properties": {"names": {"minItems": 1, "maxItems": 1}}},
             *_names_match("images", s)]
    return {"type": "object", "additionalProperties": False, "properties": props, "required": ["labels"],
            "allOf": [{"oneOf": [{"required": ["image"], "not": {"required": ["images"]}},
                                 {"required": ["images"], "not": {"required": ["image"]}}]},
                      {"anyOf": names}]}


def embed_json(s: ServerSettings) -> dict[str, Any]:
    props = {
        "images": _array(image_string(), 0, s.max_images), "texts": _array(_text(s), 0, s.max_texts),
        "names": _array({"type": "string"}, 1, s.max_images, description="echoed back as each image's 'source'"),
        "encoding": {"type": "string", "enum": list(ENCODINGS), "default": "float"},
    }
    some = [{"required": ["images"], "properties": {"images": {"minItems": 1}}},
            {"required": ["texts"], "properties": {"texts": {"minItems": 1}}}]
    return {"type": "object", "additionalProperties": False, "properties": props,
            "allOf": [{"anyOf": some}, {"anyOf": [{"not": {"required": ["names"]}}, *_names_match("images", s)]}]}


def embeddings_json(model_id: str, width: int, s: ServerSettings) -> dict[str, Any]:
    text = {"anyOf": [_text(s), _array(_text(s), 1, s.max_texts)]}
    one = image_string("image-data-uri")
    if s.allowed_url_hosts:  # the operator allows fetching from these hosts: URLs are valid items too
        one = {"anyOf": [one, {"type": "string", "format": "uri", "pattern": "^https?://",
                               "description": "an image URL on " + ", ".join(s.allowed_url_hosts)}]}
    image = {"anyOf": [one, _array(one, 1, s.max_images)]}
    props = {
        "model": {"type": "string", "enum": [model_id]},
        "input": {"description": "a string or a list of strings (token arrays are refused)"},
        "encoding_format": {"type": "string", "enum": list(ENCODINGS), "default": "float"},
        "dimensions": {"type": "integer", "enum": [width], "description": "only the model's own width"},
        "modality": {"type": "string", "enum": list(MODALITIES), "default": "text"},
        "user": {"type": "string"},
    }
    return {"type": "object", "additionalProperties": False, "properties": props, "required": ["model", "input"],
            "anyOf": [{"properties": {"modality": {"const": "text"}, "input": text}},
                      {"required": ["modality"], "properties": {"modality": {"const": "image"}, "input": image}}]}


def _json_body(schema: dict[str, Any], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}, **(extra or {})}}}


def embeddings_body(model_id: str, width: int, s: ServerSettings) -> dict[str, Any]:
    return _json_body(embeddings_json(model_id, width, s))


_FILE = {"type": "string", "format": "binary", "description": "an image file (PNG, JPEG, WebP, ...)"}


def classify_body(s: ServerSettings) -> dict[str, Any]:
    form = {"schema": {"type": "object", "required": ["image", "labels"], "properties": {
        "image": _array(_FILE, 1, s.max_images, description="image file(s)"),
        "labels": _array({"type": "string", "minLength": 1, "maxLength": s.max_text_chars,
                          "pattern": r"^[^\r\n\v\f\x1c-\x1e\x85\u2028\u2029]*\S[^\r\n\v\f\x1c-\x1e\x85\u2028\u2029]*$"},
                         1, s.max_labels, uniqueItems=True, description="one label per field"),
        "templates": {"type": "string", "enum": list(BUILTIN_TEMPLATE_SETS)},
        "top_k": {"type": "integer", "minimum": 1, "maximum": s.max_top_k, "default": 3}}}}
    return _json_body(classify_json(s), {"multipart/form-data": form})


def embed_body(s: ServerSettings) -> dict[str, Any]:
    form = {"schema": {"type": "object", "required": ["image"], "properties": {
        "image": _array(_FILE, 1, s.max_images),
        "texts": _array(_text(s), 0, s.max_texts, description="one text per field"),
        "encoding": {"type": "string", "enum": list(ENCODINGS), "default": "float"}}}}
    return _json_body(embed_json(s), {"multipart/form-data": form})


_OPENAI_ERROR = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type", "param", "code"], "properties": {
        "message": {"type": "string"}, "type": {"type": "string"},
        "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}


def openai_errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    what = {400: "malformed JSON", 401: "missing or wrong bearer token", 404: "model not served here",
            413: "body too large", 415: "not application/json", 422: "invalid input, image or dimensions",
            429: "busy: retry after Retry-After seconds", 503: "not ready or failed an integrity check",
            504: "timed out"}
    return {c: {"description": what[c], "content": {"application/json": {"schema": _OPENAI_ERROR}}}
            for c in (codes or tuple(what))}


MODEL_CARD: dict[str, Any] = {"type": "object", "required": ["id", "object", "created", "owned_by"], "properties": {
    "id": {"type": "string"}, "object": {"const": "model"}, "created": {"type": "integer"},
    "owned_by": {"type": "string"}}}
MODELS_RESPONSE: dict[str, Any] = {"type": "object", "required": ["object", "data"], "properties": {
    "object": {"const": "list"}, "data": {"type": "array", "items": MODEL_CARD}}}
EMBEDDINGS_RESPONSE: dict[str, Any] = {
    "type": "object", "required": ["object", "data", "model", "usage", "provenance", "warnings", "recipe"], "properties": {
        "object": {"const": "list"},
        "data": {"type": "array", "items": {"type": "object", "required": ["object", "index", "embedding"],
                                            "properties": {"object": {"const": "embedding"},
                                                           "index": {"type": "integer"},
                                                           "embedding": {"anyOf": [
                                                               {"type": "array", "items": {"type": "number"}},
                                                               {"type": "string"}]}}}},
        "model": {"type": "string"},
        "usage": {"type": "object", "required": ["prompt_tokens", "total_tokens"],
                  "properties": {"prompt_tokens": {"type": "integer"}, "total_tokens": {"type": "integer"}}},
        "provenance": {"type": "object"}, "warnings": {"type": "array"},
        # what `steadyclip verify` recomputes with; inputs.sha256[i] is the digest of data[i]'s input
        "recipe": {"type": "object", "required": ["settings", "model", "inputs"], "properties": {
            "inputs": {"type": "object", "required": ["modality", "sha256"], "properties": {
                "modality": {"enum": ["text", "image"]},
                "sha256": {"type": "array", "items": {"type": "string", "pattern": "^[0-9a-f]{64}$"}}}}}}}}
