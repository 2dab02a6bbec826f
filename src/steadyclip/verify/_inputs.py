"""The inputs of an OpenAI-style answer, which holds only their digests: taken from the request sent.

    steadyclip verify answer.json --inputs request.json

``--inputs`` is the JSON body the client sent to ``POST /v1/embeddings`` (``{"model", "input",
"modality"?}``) or its ``input`` alone: a JSON string or list of strings (Python: the list itself).
Texts are taken as they are; images as the ``data:...;base64,`` URIs (or bare base64) sent, decoded
to the bytes the server hashed. Each input's SHA-256 then decides its row: the recorded digest is
recomputed, another one is ``input_changed``. Without inputs every row is ``input_missing``.
"""
from __future__ import annotations

import base64
import binascii
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from steadyclip.errors import InputError
from steadyclip.verify._compare import Missing
from steadyclip.verify._source import ResultFile

__all__ = ["NO_INPUTS", "Given", "RequestInputs", "join_inputs", "read_inputs"]

Given = dict[int, "str | bytes | Missing"]  # row index -> its text, its image bytes, or why there is none

NO_INPUTS = ("an OpenAI-style answer holds no inputs, only their SHA-256: pass --inputs REQUEST.json (the JSON "
             "body sent to /v1/embeddings, or a JSON list of its inputs) to recompute this row")
_WANT = ("--inputs takes the JSON body sent to /v1/embeddings ({\"model\": ..., \"input\": [...]}) or its "
         "'input' alone: a JSON string or a list of strings")
_DATA_URI = re.compile(r"^data:[\w/+.-]*(;[\w=.-]+)*;base64,", re.IGNORECASE)  # the server's own prefix
_URL = ("http://", "https://")


@dataclass(frozen=True)
class RequestInputs:
    """The inputs of one request, in order."""

    items: tuple[str, ...]
    modality: str | None  # as the request body said; None: a bare list (the answer's modality holds)
    origin: str  # how messages name where they came from


def read_inputs(inputs: str | os.PathLike[str] | Sequence[str]) -> RequestInputs:
    """Read ``--inputs``: a path to a request body (or JSON list), or the list of inputs itself.

    Raises:
        InputError: unreadable, not JSON, or not a request body / list of strings (says what to pass).
    """
    if isinstance(inputs, (str, os.PathLike)):
        return _read_file(Path(inputs))
    items = list(inputs)
    _check_items(items, "the inputs given")
    return RequestInputs(tuple(items), None, "the inputs given")


def _read_file(p: Path) -> RequestInputs:
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except OSError as e:
        raise InputError(f"cannot read the inputs file {p}: {e.strerror or e}") from e
    except (UnicodeDecodeError, ValueError) as e:
        raise InputError(f"{p} is not a JSON document ({e}); {_WANT}") from e
    modality = None
    if isinstance(doc, dict):
        if "input" not in doc:
            raise InputError(f"{p} is a JSON object without 'input' (keys {sorted(doc)[:8]}); {_WANT}")
        modality = doc.get("modality", "text")
        if modality not in ("text", "image"):
            raise InputError(f"{p} says modality {modality!r}; /v1/embeddings takes 'text' or 'image'")
        doc = doc["input"]
    items = [doc] if isinstance(doc, str) else doc
    _check_items(items, str(p))
    return RequestInputs(tuple(items), modality, str(p))


def _check_items(items: object, origin: str) -> None:
    if not isinstance(items, list) or not items or not all(isinstance(x, str) for x in items):
        raise InputError(f"{origin} holds no list of input strings; {_WANT}")


def join_inputs(result: ResultFile, inputs: RequestInputs | None) -> tuple[ResultFile, Given]:
    """An answer's rows with their inputs: texts shown as themselves, and each row's payload (or why none).

    Raises:
        InputError: inputs given for a result that names its own, or inputs that cannot be this
            answer's request (another modality, another count, an image that is not base64).
    """
    if result.kind != "embeddings":
        if inputs is not None:
            raise InputError(f"--inputs is for OpenAI-style /v1/embeddings answers, which hold no inputs; "
                             f"{result.path.name} is a {result.kind} result that names its inputs itself "
                             "(pass --images-root DIR when they moved)")
        return result, {}
    if inputs is None:
        return result, {r.index: Missing(NO_INPUTS) for r in result.rows}
    modality = result.rows[0].kind if result.rows else "text"
    if inputs.modality not in (None, modality):
        raise InputError(f"{inputs.origin} is a request for {inputs.modality} embeddings, but {result.path.name} "
                         f"embedded {modality}s; pass the request this answer was for")
    if len(inputs.items) != len(result.rows):
        raise InputError(f"{inputs.origin} holds {len(inputs.items)} inputs but {result.path.name} has "
                         f"{len(result.rows)} embeddings; pass the request this answer was for")
    given: Given = {}
    rows = []
    for row, item in zip(result.rows, inputs.items):
        if modality == "text":
            given[row.index] = item
            row = replace(row, source=item)
        elif item.startswith(_URL):
            given[row.index] = Missing(f"input[{row.index}] is a URL and verify fetches nothing: put the image "
                                       "in the inputs as a data: URI ('data:image/png;base64,...')")
        else:
            given[row.index] = _image_bytes(item, row.index, inputs.origin)
        rows.append(row)
    return replace(result, rows=tuple(rows)), given


def _image_bytes(item: str, index: int, origin: str) -> bytes:
    """The bytes of a base64 image input, as the server decoded them."""
    try:
        data = base64.b64decode("".join(_DATA_URI.sub("", item.strip(), count=1).split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise InputError(f"{origin}: input[{index}] is not base64 image data ({e}); give each image as it was "
                         "sent, 'data:image/png;base64,<bytes>'") from e
    if not data:
        raise InputError(f"{origin}: input[{index}] is empty; give each image as it was sent")
    return data
