"""Read a result file into one shape: what was computed, how, and the numbers stored per row.

Formats: a batch Parquet file (``steadyclip batch``, local or Ray), the documents printed by
``classify --json`` and ``embed --json``, the server's ``/v1/classify`` and ``/v1/embed`` answers
(the same documents; an upload's ``source`` is its file name, found under ``--images-root``), and
its OpenAI-style ``/v1/embeddings`` answers (kind ``embeddings``: no inputs, only their digests in
``recipe.inputs``; a row's ``source`` is ``input[i]`` until :mod:`steadyclip.verify._inputs` joins the
request). Anything else, a truncated file, or a document edited into nonsense is a
:class:`~steadyclip.errors.ResultFileError` naming what is wrong.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from steadyclip.errors import ResultFileError

__all__ = ["ResultFile", "StoredRow", "read_result"]

_PARQUET_MAGIC = b"PAR1"


@dataclass(frozen=True)
class StoredRow:
    """One row of a result as stored: its input, and either its numbers or its typed error."""

    index: int
    kind: str  # "image" | "text"
    source: str  # the image path as listed, or the text
    sha256: str | None  # of the input's bytes (images); None where unreadable or not recorded
    error_type: str | None
    top_labels: tuple[str, ...] | None = None
    numbers: dict[str, np.ndarray] = field(default_factory=dict)  # column -> values (top_probs, probs, embedding)


@dataclass(frozen=True)
class ResultFile:
    """A result, read: its kind, provenance, recipe and rows."""

    path: Path
    kind: str  # "batch" | "classify" | "embed" | "embeddings"
    provenance: dict[str, Any]
    settings: dict[str, Any] | None  # EngineSettings.to_dict(); None for files written before it was recorded
    model: dict[str, Any]
    labels: tuple[str, ...]
    templates: list[str] | str | None  # the template list (batch) or the template set's name (CLI)
    top_k: int
    rows: tuple[StoredRow, ...]
    input_root: str | None = None  # the folder a batch job listed (for --images-root)


def read_result(path: str | os.PathLike[str]) -> ResultFile:
    """Read a result file of any supported kind.

    Raises:
        ResultFileError: missing, not a steadyclip result, truncated, or not a document verify can read.
    """
    p = Path(path)
    try:
        with p.open("rb") as f:
            head = f.read(4)
    except OSError as e:
        raise ResultFileError(f"cannot read {p}: {e.strerror or e}") from e
    try:
        if head == _PARQUET_MAGIC:
            return _read_batch(p)
        return _read_json(p)
    except ResultFileError:
        raise
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
        raise ResultFileError(f"{p} looks like a steadyclip result but a field is missing or malformed "
                              f"({type(e).__name__}: {e}); was it edited by hand?") from e


# ---- batch Parquet -------------------------------------------------------------------------
def _read_batch(p: Path) -> ResultFile:
    import pyarrow.parquet as pq

    from steadyclip.batch.table import METADATA_KEY

    try:
        table = pq.read_table(p)
    except Exception as e:
        raise ResultFileError(f"{p} is not a readable Parquet file ({e}); truncated or damaged?") from e
    raw = (table.schema.metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise ResultFileError(f"{p} is a Parquet file without steadyclip metadata; it was not written by "
                              "`steadyclip batch`")
    meta = _json_object(raw, f"{p}'s steadyclip metadata")
    recipe = meta.get("recipe") or {}
    job = meta["job"]
    prov = meta["provenance"]
    model = recipe.get("model") or {"model_id": prov["model_id"], "source": None}
    cols = set(table.column_names)
    data = table.to_pydict()
    rows = []
    for i in range(table.num_rows):
        numbers: dict[str, np.ndarray] = {}
        for name, dtype in (("top_probs", np.float64), ("probs", np.float64), ("embedding", np.float32)):
            if name in cols and data[name][i] is not None:
                numbers[name] = np.asarray(data[name][i], dtype=dtype)
        top = data["top_labels"][i] if "top_labels" in cols else None
        rows.append(StoredRow(int(data["index"][i]), "image", str(data["path"][i]), data["sha256"][i],
                              data["error_type"][i] if data["status"][i] == "error" else None,
                              tuple(top) if top is not None else None, numbers))
    if len(rows) != meta.get("rows", len(rows)):
        raise ResultFileError(f"{p} holds {len(rows)} rows but its metadata says {meta.get('rows')}; damaged?")
    desc = job.get("description") or {}
    root = desc.get("inputs") if desc.get("kind") == "folder" else None
    return ResultFile(p, "batch", prov, recipe.get("settings"), model, tuple(meta.get("labels") or ()),
                      meta.get("templates"), int(job["options"]["top_k"]), tuple(rows), root)


# ---- CLI JSON documents ----------------------------------------------------------------------
def _read_json(p: Path) -> ResultFile:
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ResultFileError(f"{p} is neither a Parquet file nor a JSON document; not a steadyclip result") from e
    doc = _json_object(text, str(p))
    if "provenance" not in doc:
        raise ResultFileError(f"{p} is a JSON document without a 'provenance' section; not a steadyclip result")
    recipe = doc.get("recipe")
    if not isinstance(recipe, dict):
        raise ResultFileError(f"{p} has no 'recipe' section (the settings and input digests verify needs); "
                              "it was written before steadyclip recorded them: recompute it with this version")
    reader = _JSON_KINDS.get(_json_kind(doc))
    if reader is None:
        raise ResultFileError(f"{p} is a JSON document steadyclip did not write (keys {sorted(doc)})")
    return reader(p, doc, recipe)


def _json_kind(doc: dict[str, Any]) -> str:
    if doc.get("object") == "list" and "data" in doc:
        return "embeddings"
    if "results" in doc:
        return "classify"
    if "images" in doc or "texts" in doc:
        return "embed"
    return "unknown"


def _classify_doc(p: Path, doc: dict[str, Any], recipe: dict[str, Any]) -> ResultFile:
    labels = tuple(recipe["labels"])
    rows = []
    for i, r in enumerate(doc["results"]):
        if "error" in r:
            rows.append(StoredRow(i, "image", str(r["source"]), r.get("sha256"), str(r["error"]["type"])))
            continue
        top = tuple(str(t["label"]) for t in r["top"])
        numbers = {"top_probs": np.asarray([t["prob"] for t in r["top"]], dtype=np.float64),
                   "probs": np.asarray([r["probs"][lab] for lab in labels], dtype=np.float64)}
        rows.append(StoredRow(i, "image", str(r["source"]), r.get("sha256"), None, top, numbers))
    return ResultFile(p, "classify", doc["provenance"], recipe["settings"], recipe["model"], labels,
                      recipe.get("templates"), int(recipe["top_k"]), tuple(rows))


def _vector(value: Any, encoding: str | None) -> np.ndarray:
    """A stored embedding: a list of floats, or (a server's ``encoding="base64"``) little-endian float32 bytes."""
    if isinstance(value, str) and (encoding or "").startswith("base64"):
        import base64

        return np.frombuffer(base64.b64decode(value, validate=True), dtype="<f4").astype(np.float32)
    return np.asarray(value, dtype=np.float32)


def _embed_doc(p: Path, doc: dict[str, Any], recipe: dict[str, Any]) -> ResultFile:
    rows: list[StoredRow] = []
    enc = doc.get("encoding")
    for r in doc.get("images") or []:
        rows.append(StoredRow(len(rows), "image", str(r["source"]), r.get("sha256"), None, None,
                              {"embedding": _vector(r["embedding"], enc)}))
    for r in doc.get("texts") or []:
        rows.append(StoredRow(len(rows), "text", str(r["text"]), None, None, None,
                              {"embedding": _vector(r["embedding"], enc)}))
    return ResultFile(p, "embed", doc["provenance"], recipe["settings"], recipe["model"], (), None, 1, tuple(rows))


def _embeddings_doc(p: Path, doc: dict[str, Any], recipe: dict[str, Any]) -> ResultFile:
    """An OpenAI-style answer: embeddings in ``data``, the inputs' digests in ``recipe.inputs``."""
    inputs = recipe.get("inputs")
    if not isinstance(inputs, dict) or inputs.get("modality") not in ("text", "image"):
        raise ResultFileError(f"{p} is a /v1/embeddings answer without 'recipe.inputs' (the input digests verify "
                              "needs); it was written before steadyclip recorded them: recompute it with this version")
    digests = list(inputs["sha256"])
    data = sorted(doc["data"], key=lambda d: int(d["index"]))
    if [int(d["index"]) for d in data] != list(range(len(digests))):
        raise ResultFileError(f"{p} holds {len(data)} embeddings but digests of {len(digests)} inputs (indices "
                              f"{[d['index'] for d in data][:8]}); was it edited by hand?")
    kind = str(inputs["modality"])
    rows = tuple(StoredRow(i, kind, f"input[{i}]", str(sha), None, None,
                           {"embedding": _vector(d["embedding"], "base64" if isinstance(d["embedding"], str) else None)})
                 for i, (d, sha) in enumerate(zip(data, digests)))
    return ResultFile(p, "embeddings", doc["provenance"], recipe["settings"], recipe["model"], (), None, 1, rows)


_JSON_KINDS: dict[str, Callable[[Path, dict[str, Any], dict[str, Any]], ResultFile]] = {
    "classify": _classify_doc, "embed": _embed_doc, "embeddings": _embeddings_doc,
}


def _json_object(raw: str | bytes, what: str) -> dict[str, Any]:
    try:
        doc = json.loads(raw)
    except ValueError as e:
        raise ResultFileError(f"{what} is not valid JSON ({e}); not a steadyclip result, or truncated") from e
    if not isinstance(doc, dict):
        raise ResultFileError(f"{what} is JSON but not an object ({type(doc).__name__}); not a steadyclip result")
    return doc
