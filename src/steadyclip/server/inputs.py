"""Turn an HTTP request (multipart or JSON) into checked, plain Python values.

Everything a client sends is treated as data: images are bytes (never a path
or URL the server would open), templates are a built-in name or an explicit
list (never a file name). Every problem becomes an :class:`ApiError` with a
4xx status and a message that says what to send instead.
"""
from __future__ import annotations

import base64
import binascii
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile
from starlette.requests import Request

from steadyclip.engine.prompts import (
    BUILTIN_TEMPLATE_SETS,
    TemplateSet,
    get_template_set,
    validate_labels,
)
from steadyclip.errors import InputError, TemplateError
from steadyclip.server.http_errors import ApiError, describe_validation_errors
from steadyclip.server.schemas import ClassifyJSON, EmbedJSON
from steadyclip.server.settings import ServerSettings

_logger = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)

_DATA_URL = re.compile(r"^data:[\w/+.-]*(;[\w=.-]+)*;base64,", re.IGNORECASE)
_IMAGE_FIELDS = ("image", "images")


@dataclass(frozen=True)
class ImagePayload:
    """One uploaded image: its bytes and the name to echo back."""

    data: bytes
    name: str | None


@dataclass(frozen=True)
class ClassifyInput:
    images: list[ImagePayload]
    labels: list[str]
    templates: TemplateSet | None  # None: the model's default set
    top_k: int


@dataclass(frozen=True)
class EmbedInput:
    images: list[ImagePayload]
    texts: list[str]
    encoding: str


def _unprocessable(message: str, type_: str = "InputError") -> ApiError:
    return ApiError(422, type_, message)


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def _unsupported(media: str) -> ApiError:
    return ApiError(
        415, "UnsupportedMediaType",
        f"Content-Type {media or '(none)'!r} is not supported; send multipart/form-data (file field 'image') "
        "or application/json (base64 images)",
    )


async def _parse_json(request: Request, model: type[M]) -> M:
    body = await request.body()
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        errors = e.errors()
        if any(err.get("type") == "json_invalid" for err in errors):
            raise ApiError(400, "BadRequest", f"the body is not valid JSON: {errors[0].get('msg', '')}") from e
        raise ApiError(422, "ValidationError", describe_validation_errors(errors)) from e


async def _parse_form(request: Request, settings: ServerSettings) -> Any:
    try:
        return await request.form(
            max_files=settings.max_images,
            max_fields=settings.max_labels + settings.max_texts + settings.max_templates + 8,
            max_part_size=settings.max_body_bytes,  # the gate already caps the whole body
        )
    except ApiError:
        raise
    except Exception as e:  # starlette raises HTTPException(400) or MultiPartException on malformed bodies
        detail = getattr(e, "detail", None) or str(e) or type(e).__name__
        raise ApiError(400, "BadRequest", f"malformed multipart body: {detail}") from e


def decode_base64_image(text: str, index: int) -> bytes:
    """Bytes of a base64 string or ``data:...;base64,`` URL; 422 if it is not base64."""
    stripped = _DATA_URL.sub("", text.strip(), count=1)
    try:
        data = base64.b64decode("".join(stripped.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise _unprocessable(
            f"images[{index}] is not valid base64 ({e}); send the image file's bytes base64-encoded "
            "(the server never opens paths or URLs)", "ImageDecodeError",
        ) from e
    if not data:
        raise _unprocessable(f"images[{index}] is empty", "ImageDecodeError")
    return data


async def _form_images(form: Any) -> list[ImagePayload]:
    images: list[ImagePayload] = []
    for field in _IMAGE_FIELDS:
        for value in form.getlist(field):
            if not isinstance(value, UploadFile):
                raise _unprocessable(
                    f"form field {field!r} must be a file upload, got text {str(value)[:40]!r}; "
                    "the server never opens paths - upload the file itself (curl -F image=@photo.png)",
                    "ImageSourceError",
                )
            images.append(ImagePayload(await value.read(), value.filename))
    return images


def _form_strings(form: Any, field: str) -> list[str]:
    values = form.getlist(field)
    for v in values:
        if not isinstance(v, str):
            raise _unprocessable(f"form field {field!r} must be text, got a file upload")
    return list(values)


def _check_count(n_images: int, settings: ServerSettings, *, required: bool) -> None:
    if required and not n_images:
        raise _unprocessable(
            "no image in the request; send a file field 'image' (multipart) or 'image'/'images' (JSON, base64)",
            "ImageSourceError",
        )
    if n_images > settings.max_images:
        raise _unprocessable(
            f"{n_images} images exceed this server's limit of {settings.max_images} per request; split the "
            "request or use `steadyclip batch` for large jobs"
        )


def _check_texts(texts: Sequence[str], what: str, settings: ServerSettings) -> None:
    for i, t in enumerate(texts):
        if len(t) > settings.max_text_chars:
            raise _unprocessable(
                f"{what}[{i}] has {len(t)} characters, over the limit of {settings.max_text_chars}; "
                "the model reads only its first few dozen tokens anyway - shorten it"
            )


def resolve_templates(spec: str | Sequence[str] | None, settings: ServerSettings) -> TemplateSet | None:
    """A built-in template set by name, or an explicit list; never a file on the server.

    ``None`` (none given) stays ``None``: the model's own default set, chosen by the service.
    """
    if spec is None:
        return None
    if isinstance(spec, str):
        if spec not in BUILTIN_TEMPLATE_SETS:
            raise _unprocessable(
                f"templates {spec!r} is not a built-in set {list(BUILTIN_TEMPLATE_SETS)}; give one of those or "
                "a list of templates each containing '{}' (the server never reads template files)",
                "TemplateError",
            )
        return get_template_set(spec)
    templates = list(spec)
    if len(templates) > settings.max_templates:
        raise _unprocessable(f"{len(templates)} templates exceed the limit of {settings.max_templates}",
                             "TemplateError")
    _check_texts(templates, "templates", settings)
    try:
        return get_template_set(templates)
    except TemplateError as e:
        raise _unprocessable(str(e), "TemplateError") from e


def _labels(raw: Sequence[str], settings: ServerSettings) -> list[str]:
    if len(raw) > settings.max_labels:
        raise _unprocessable(f"{len(raw)} labels exceed this server's limit of {settings.max_labels}; "
                             "split the request", "LabelError")
    _check_texts(raw, "labels", settings)
    try:
        return validate_labels(list(raw), max_labels=settings.max_labels)
    except InputError as e:
        raise _unprocessable(str(e), type(e).__name__) from e


def _top_k(value: object, settings: ServerSettings) -> int:
    try:
        k = int(str(value).strip()) if not isinstance(value, int) else value
    except ValueError:
        raise _unprocessable(f"top_k must be an integer, got {value!r}") from None
    if not 1 <= k <= settings.max_top_k:
        raise _unprocessable(f"top_k must be between 1 and {settings.max_top_k}, got {k}")
    return k


def _named(datas: list[bytes], names: list[str] | None) -> list[ImagePayload]:
    if names is not None and len(names) != len(datas):
        raise _unprocessable(f"'names' has {len(names)} entries but there are {len(datas)} images")
    return [ImagePayload(d, names[i] if names else None) for i, d in enumerate(datas)]


async def read_classify(request: Request, settings: ServerSettings) -> ClassifyInput:
    """Parse and check a ``/v1/classify`` request."""
    media = _media_type(request)
    if media == "application/json":
        doc = await _parse_json(request, ClassifyJSON)
        encoded = ([doc.image] if doc.image is not None else []) + list(doc.images or [])
        _check_count(len(encoded), settings, required=True)  # before decoding any
        images = _named([decode_base64_image(s, i) for i, s in enumerate(encoded)], doc.names)
        raw_labels, templates, top_k = doc.labels, doc.templates, doc.top_k
    elif media == "multipart/form-data":
        form = await _parse_form(request, settings)
        images = await _form_images(form)
        # A field may hold several labels, one per line (a pasted list); blank lines are dropped.
        raw_labels = [ln for v in _form_strings(form, "labels") for ln in v.splitlines() if ln.strip()]
        tpl = _form_strings(form, "templates")
        templates = None if not tpl or (len(tpl) == 1 and not tpl[0].strip()) else (
            tpl[0].strip() if len(tpl) == 1 and "{}" not in tpl[0] else tpl)
        top_k = form.get("top_k") or 3
    else:
        raise _unsupported(media)
    _check_count(len(images), settings, required=True)
    return ClassifyInput(images, _labels(raw_labels, settings), resolve_templates(templates, settings),
                         _top_k(top_k, settings))


async def read_embed(request: Request, settings: ServerSettings) -> EmbedInput:
    """Parse and check a ``/v1/embed`` request."""
    media = _media_type(request)
    if media == "application/json":
        doc = await _parse_json(request, EmbedJSON)
        _check_count(len(doc.images), settings, required=False)
        images = _named([decode_base64_image(s, i) for i, s in enumerate(doc.images)], doc.names)
        texts, encoding = list(doc.texts), str(doc.encoding)
    elif media == "multipart/form-data":
        form = await _parse_form(request, settings)
        images = await _form_images(form)
        texts = _form_strings(form, "texts")
        encoding = str(form.get("encoding") or "float")
        if encoding not in ("float", "base64"):
            raise _unprocessable(f"encoding must be 'float' or 'base64', got {encoding!r}")
    else:
        raise _unsupported(media)
    _check_count(len(images), settings, required=False)
    if not images and not texts:
        raise _unprocessable("nothing to embed; send 'images' and/or 'texts'")
    if len(texts) > settings.max_texts:
        raise _unprocessable(f"{len(texts)} texts exceed this server's limit of {settings.max_texts}; "
                             "split the request")
    _check_texts(texts, "texts", settings)
    return EmbedInput(images, texts, encoding)
