"""OpenAI-compatible routes: ``POST /v1/embeddings``, ``GET /v1/models``, ``GET /v1/models/{id}``.

Requests and responses follow OpenAI's embeddings API, so the ``openai`` client
works unchanged (``base_url="http://127.0.0.1:8000/v1"``). Images follow
Infinity's convention: ``"modality": "image"`` and each input a base64
``data:`` URI. The server fetches no URL unless its operator allowed the host (see ``fetch``).
Answers add three top-level fields, which OpenAI's clients keep as extras (the ``openai``
client's ``model_extra``, and in ``model_dump_json()``): steadyclip's ``provenance``, the decoders'
``warnings``, and the ``recipe`` that ``steadyclip verify`` recomputes with (as ``/v1/embed``'s),
plus ``recipe.inputs``: the modality and each input's SHA-256 in ``data`` order (of a text's UTF-8
bytes, of an image's decoded bytes). Digests, not copies: the ``data`` items keep OpenAI's exact
shape. Errors use OpenAI's error object (see :mod:`steadyclip.server.http_errors`).
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from steadyclip.errors import ImageSourceError
from steadyclip.server import openapi_constraints as oc
from steadyclip.server.fetch import URL_PREFIXES, fetch_image, host_allowed
from steadyclip.server.http_errors import ApiError
from steadyclip.server.inputs import EmbedInput, ImagePayload, decode_base64_image
from steadyclip.server.service import Service
from steadyclip.server.settings import ServerSettings

_logger = logging.getLogger(__name__)

_FIELDS = {"model", "input", "encoding_format", "dimensions", "modality", "user"}
_DATA_URI = re.compile(oc.DATA_URI_PATTERN)


@dataclass(frozen=True)
class EmbeddingsRequest:
    inputs: list[str]
    modality: str
    encoding: str


def _bad(message: str, param: str | None, type_: str = "InvalidRequest", status: int = 422) -> ApiError:
    return ApiError(status, type_, message, param=param)


def _check_object(doc: object, model_id: str, width: int) -> dict[str, Any]:
    if not isinstance(doc, dict):
        raise _bad(f"the body must be a JSON object, got {type(doc).__name__}", None)
    unknown = sorted(set(doc) - _FIELDS)
    if unknown:
        raise _bad(f"unknown field(s) {unknown}; this route takes {sorted(_FIELDS)}", unknown[0])
    if "model" not in doc or not isinstance(doc["model"], str):
        raise _bad(f"'model' is required and must be a string; this server serves {model_id!r}", "model")
    if doc["model"] != model_id:
        raise _bad(f"model {doc['model']!r} is not served here; this server serves {model_id!r} "
                   "(GET /v1/models lists it)", "model", "model_not_found", 404)
    for name, allowed in (("encoding_format", oc.ENCODINGS), ("modality", oc.MODALITIES)):
        if name in doc and doc[name] not in allowed:
            raise _bad(f"{name} must be one of {list(allowed)}, got {doc[name]!r}", name)
    dims = doc.get("dimensions")
    if "dimensions" in doc and (not isinstance(dims, int) or isinstance(dims, bool) or dims != width):
        raise _bad(f"dimensions={dims!r} is not supported: {model_id} embeds into exactly {width} dimensions "
                   "and steadyclip never truncates them; omit 'dimensions' or send "
                   f"{width}", "dimensions")
    if "user" in doc and not isinstance(doc["user"], str):
        raise _bad("'user' must be a string", "user")
    return doc


def _inputs(raw: object, modality: str, settings: ServerSettings) -> list[str]:
    items = [raw] if isinstance(raw, str) else raw
    if not isinstance(items, list) or not items:
        raise _bad("'input' must be a string or a non-empty list of strings", "input")
    if any(isinstance(x, (int, list)) and not isinstance(x, bool) for x in items):
        raise _bad("token arrays are not supported: steadyclip tokenizes with the model's own tokenizer; "
                   "send the text itself ('input': \"a photo of a cat\" or a list of strings)", "input",
                   "TokenInputNotSupported")
    for i, x in enumerate(items):
        if not isinstance(x, str):
            raise _bad(f"input[{i}] is {type(x).__name__}, not a string", "input")
    limit = settings.max_images if modality == "image" else settings.max_texts
    if len(items) > limit:
        raise _bad(f"{len(items)} inputs exceed this server's limit of {limit} {modality}s per request; "
                   "split the request", "input")
    for i, x in enumerate(items):
        if modality == "text" and len(x) > settings.max_text_chars:
            raise _bad(f"input[{i}] has {len(x)} characters, over the limit of {settings.max_text_chars}; "
                       "shorten it (the model reads only its first few dozen tokens)", "input")
        if modality == "image" and x.startswith(URL_PREFIXES) and settings.allowed_url_hosts:
            if not host_allowed(x, settings.allowed_url_hosts):
                raise _bad(f"input[{i}]: this server fetches images only from "
                           f"{', '.join(settings.allowed_url_hosts)}; send other images as base64 data URIs",
                           "input", "ImageSourceError")
        elif modality == "image" and not _DATA_URI.match(x):
            where = ("a URL: this server fetches no URLs (its operator allows none: --allow-url-host)"
                     if "://" in x[:16] else "not a base64 data URI")
            raise _bad(f"input[{i}] is {where}; send each image as 'data:image/png;base64,<bytes>' "
                       "(with \"modality\": \"image\")", "input", "ImageSourceError")
    return items


async def read_request(request: Request, model_id: str, width: int, settings: ServerSettings) -> EmbeddingsRequest:
    """Parse and check a ``POST /v1/embeddings`` body; every problem is a 4xx with the field at fault."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media != "application/json":
        raise _bad(f"Content-Type {media or '(none)'!r} is not supported; send application/json", None,
                   "UnsupportedMediaType", 415)
    try:
        doc = json.loads(await request.body())
    except (ValueError, UnicodeDecodeError) as e:
        raise _bad(f"the body is not valid JSON: {e}", None, "BadRequest", 400) from e
    doc = _check_object(doc, model_id, width)
    if "input" not in doc:
        raise _bad("'input' is required: a string or a list of strings", "input")
    modality = str(doc.get("modality", "text"))
    return EmbeddingsRequest(_inputs(doc["input"], modality, settings), modality,
                             str(doc.get("encoding_format", "float")))


async def embeddings(service: Service, req: EmbeddingsRequest, model_id: str) -> dict[str, Any]:
    """OpenAI's embeddings list for one request, plus provenance, warnings and the recipe (with input digests)."""
    if req.modality == "image":
        images = [ImagePayload(await _image_bytes(service, s, i), None) for i, s in enumerate(req.inputs)]
        inp, key, raw = EmbedInput(images, [], req.encoding), "images", [img.data for img in images]
        tokens = 0
    else:
        inp, key, raw = EmbedInput([], req.inputs, req.encoding), "texts", [t.encode("utf-8") for t in req.inputs]
        tokens = await service.count_tokens(req.inputs)
    doc = await service.embed(inp)
    data = [{"object": "embedding", "index": i, "embedding": row["embedding"]} for i, row in enumerate(doc[key])]
    # what `steadyclip verify answer.json --inputs request.json` checks the request's inputs against
    inputs = {"modality": req.modality, "sha256": [hashlib.sha256(b).hexdigest() for b in raw]}
    return {"object": "list", "data": data, "model": model_id,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            "provenance": doc["provenance"], "warnings": doc["warnings"], "recipe": doc["recipe"] | {"inputs": inputs}}


async def _image_bytes(service: Service, item: str, index: int) -> bytes:
    if not item.startswith(URL_PREFIXES):
        return decode_base64_image(item, index)
    settings = service.settings
    try:
        return await asyncio.to_thread(fetch_image, item, settings.allowed_url_hosts, settings.max_body_bytes)
    except ImageSourceError as e:
        raise _bad(f"input[{index}]: {e}", "input", "ImageSourceError") from e


def model_card(model_id: str, created: int) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "steadyclip"}


def add_routes(app: FastAPI, service: Service, settings: ServerSettings, model_id: str, width: int) -> None:
    """Register the OpenAI-compatible routes on ``app``."""

    @app.post("/v1/embeddings", tags=["openai"], openapi_extra=oc.embeddings_body(model_id, width, settings),
              responses={200: {"content": {"application/json": {"schema": oc.EMBEDDINGS_RESPONSE}},
                               "description": "OpenAI's embedding list"}, **oc.openai_errors()})
    async def create_embeddings(request: Request) -> JSONResponse:
        """OpenAI-compatible embeddings of texts, or of images with `"modality": "image"` (data URIs)."""
        async def work() -> dict[str, Any]:
            return await embeddings(service, await read_request(request, model_id, width, settings), model_id)

        return JSONResponse(await service.with_timeout(work()))

    @app.get("/v1/models", tags=["openai"],
             responses={200: {"content": {"application/json": {"schema": oc.MODELS_RESPONSE}},
                              "description": "the served model"}, **oc.openai_errors(401)})
    async def list_models() -> JSONResponse:
        """The served model, in OpenAI's list shape."""
        return JSONResponse({"object": "list", "data": [model_card(model_id, service.created)]})

    @app.get("/v1/models/{model:path}", tags=["openai"],
             responses={200: {"content": {"application/json": {"schema": oc.MODEL_CARD}},
                              "description": "the served model"}, **oc.openai_errors(401, 404)})
    async def retrieve_model(model: str) -> JSONResponse:
        """One model by id (only the served one exists)."""
        if model != model_id:
            raise _bad(f"model {model!r} is not served here; this server serves {model_id!r}", "model",
                       "model_not_found", 404)
        return JSONResponse(model_card(model_id, service.created))
