"""The output table: one schema for every part and the final file, and rows -> Arrow.

Columns (in order):
    index          int64     position of the input in the job's order
    path           string    the input as listed
    sha256         string    SHA-256 of the file's bytes (null if unreadable)
    status         string    "ok" or "error"
    error_type     string    e.g. "ImageDecodeError" (null when ok)
    error_message  string    what went wrong and what to do (null when ok)
    top_labels     list<string>          k best labels, best first     (with labels)
    top_probs      list<double>          their probabilities           (with labels)
    probs          fixed_size_list<double>[C]  all C labels, label order (with all_probs)
    embedding      fixed_size_list<float>[D]   L2-normalised image embedding (with embeddings)
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from steadyclip.engine.outcome import ImageOutcome
from steadyclip.engine.prompts import TemplateSet

if TYPE_CHECKING:
    from steadyclip.engine import Engine

__all__ = ["Columns", "build_table", "fixed_list", "make_schema"]

METADATA_KEY = b"steadyclip"


@dataclass(frozen=True)
class Columns:
    """Which optional columns a job writes, and their widths."""

    labels: tuple[str, ...]
    top_k: int
    all_probs: bool
    embedding_dim: int | None  # None: no embedding column

    @property
    def classify(self) -> bool:
        return bool(self.labels)


def make_schema(cols: Columns) -> pa.Schema:
    """The Arrow schema of every part and of the final file (metadata added at assembly)."""
    fields = [
        pa.field("index", pa.int64(), nullable=False),
        pa.field("path", pa.string(), nullable=False),
        pa.field("sha256", pa.string()),
        pa.field("status", pa.string(), nullable=False),
        pa.field("error_type", pa.string()),
        pa.field("error_message", pa.string()),
    ]
    if cols.classify:
        fields += [pa.field("top_labels", pa.list_(pa.string())), pa.field("top_probs", pa.list_(pa.float64()))]
        if cols.all_probs:
            fields.append(pa.field("probs", pa.list_(pa.float64(), len(cols.labels))))
    if cols.embedding_dim is not None:
        fields.append(pa.field("embedding", pa.list_(pa.float32(), cols.embedding_dim)))
    return pa.schema(fields)


def build_table(results: Sequence[ImageOutcome], cols: Columns, schema: pa.Schema, *, engine: Engine,
                class_emb: np.ndarray | None, templates: TemplateSet | None) -> pa.Table:
    """Rows for one part: classify the successful embeddings and lay everything out as Arrow."""
    ok = [r for r in results if r.ok]
    top_labels: dict[int, list[str]] = {}
    top_probs: dict[int, list[float]] = {}
    probs: dict[int, tuple[float, ...]] = {}
    if cols.classify and ok:
        assert class_emb is not None and templates is not None
        emb = np.stack([r.embedding for r in ok if r.embedding is not None])  # (N, D)
        classified = engine.classify_embeddings(emb, class_emb, list(cols.labels), templates, top_k=cols.top_k)
        for r, c in zip(ok, classified):
            top_labels[r.index] = [lab for lab, _ in c.top]
            top_probs[r.index] = [p for _, p in c.top]
            probs[r.index] = c.probs
    data: dict[str, Any] = {
        "index": [r.index for r in results],
        "path": [r.source for r in results],
        "sha256": [r.sha256 for r in results],
        "status": ["ok" if r.ok else "error" for r in results],
        "error_type": [r.error_type for r in results],
        "error_message": [r.error_message for r in results],
    }
    if cols.classify:
        data["top_labels"] = [top_labels.get(r.index) for r in results]
        data["top_probs"] = [top_probs.get(r.index) for r in results]
        if cols.all_probs:
            data["probs"] = fixed_list([probs.get(r.index) for r in results], len(cols.labels), pa.float64())
    if cols.embedding_dim is not None:
        data["embedding"] = fixed_list([r.embedding for r in results], cols.embedding_dim, pa.float32())
    return table_from_columns(data, schema)


def table_from_columns(data: dict[str, Any], schema: pa.Schema) -> pa.Table:
    """A part's table from its columns (Python lists, or Arrow arrays already built), in the schema's order."""
    arrays = [data[f.name] if isinstance(data[f.name], pa.Array) else pa.array(data[f.name], type=f.type)
              for f in schema]
    return pa.Table.from_arrays(arrays, schema=schema)


def fixed_list(rows: Sequence[Any], width: int, value_type: pa.DataType) -> pa.Array:
    """A fixed-size list column from per-row vectors (None for a null row), values copied bitwise."""
    dtype = np.float32 if value_type == pa.float32() else np.float64
    flat = np.zeros((len(rows), width), dtype=dtype)
    valid = np.zeros(len(rows), dtype=bool)
    for i, row in enumerate(rows):
        if row is not None:
            flat[i] = np.asarray(row, dtype=dtype)
            valid[i] = True
    values = pa.array(flat.reshape(-1))  # zero-copy from NumPy (passing type= converts element by element)
    mask = pa.array(~valid)
    return pa.FixedSizeListArray.from_arrays(values, width, mask=mask)
