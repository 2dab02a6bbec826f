"""``run_text_batch``: a caption set or a query log in, one crash-safe, resumable Parquet file of embeddings out.

Flow::

    texts (streamed; text_inputs) --> chunks to Engine.submit_texts (every replica busy, a window
        of chunks in flight) --> rows in input order --> part files --> final file, assembled atomically

Each row's embedding is the bits ``Engine.embed_texts([text])`` gives for that text alone: a text
runs at the shape its own length decides (``engine.text_shapes``), whatever its neighbours. Parts,
journal, resume and assembly are the image jobs' own (``_job``, ``writer``).

Columns (in order):
    index          int64     line (0-based) or data row of the input
    text           string    the text as read (null for a missing cell)
    text_sha256    string    SHA-256 of the text's bytes as read (UTF-8)
    status         string    "ok" or "error"
    error_type     string    "TextInputError" for a blank, non-UTF-8 or missing text (null when ok)
    error_message  string    what went wrong and what to do (null when ok)
    truncated      bool      the text was longer than the model's context and was cut (null: error row,
                             or a tokenizer that cannot tell)
    embedding      fixed_size_list<float>[D]   L2-normalised text embedding (null on an error row)
"""
from __future__ import annotations

import functools
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from itertools import islice
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from steadyclip._util.futures import completed
from steadyclip.batch._job import (
    MODEL_KEYS,
    BatchProgress,
    BatchSummary,
    check_listing,
    execution,
    write_parts,
)
from steadyclip.batch.table import fixed_list, table_from_columns
from steadyclip.batch.text_inputs import (
    TextItem,
    TextListingHasher,
    TextSource,
    open_texts,
)
from steadyclip.batch.writer import JobSpec, PartStore, kill_point, read_metadata
from steadyclip.engine.prompts import truncated
from steadyclip.errors import BatchJobError, InputError
from steadyclip.numerics import identity

if TYPE_CHECKING:
    from steadyclip.batch.ray_texts import RayTextPipeline
    from steadyclip.engine import Engine

_logger = logging.getLogger(__name__)

__all__ = ["TextOutcome", "TextPipeline", "run_text_batch", "text_schema"]

DEFAULT_PART_SIZE = 1000
# Texts per engine call: enough to fill every bucket's fixed-shape forwards (a call pads each
# bucket's last forward), and split by the engine into one task per forward over the replicas.
CHUNK_MICRO_BATCHES = 16


@dataclass(frozen=True, slots=True, eq=False)
class TextOutcome:
    """One text's row: its embedding, or why it could not be embedded."""

    index: int
    text: str | None
    sha256: str | None
    embedding: np.ndarray | None = None  # (D,) L2-normalised float32
    truncated: bool | None = None
    error_message: str | None = None

    @property
    def ok(self) -> bool:
        return self.error_message is None

    @property
    def error_type(self) -> str | None:
        return None if self.ok else "TextInputError"


class TextPipeline:
    """Chunks of texts to the engine (its replicas where it has them), rows back in input order."""

    def __init__(self, engine: Engine, *, chunk: int | None = None, window: int | None = None) -> None:
        self.engine = engine
        self.chunk = chunk or CHUNK_MICRO_BATCHES * engine.text_micro_batch
        self.workers = engine.replicas
        self.window = window or engine.replicas + 1  # a chunk already spreads over every replica
        self.model_s = 0.0  # not measured: the model runs in the replicas (or inside the engine call)
        self.wait_s = 0.0

    def run(self, items: Iterator[TextItem], part_size: int) -> Iterator[list[TextOutcome]]:
        """Ordered rows, one chunk at a time (the runner groups them into parts)."""
        del part_size
        window: deque[tuple[list[TextItem], Future[np.ndarray]]] = deque()
        for chunk in iter(lambda: list(islice(items, self.chunk)), []):
            window.append((chunk, self._submit(chunk)))
            if len(window) >= self.window:
                yield self._collect(*window.popleft())
        while window:
            yield self._collect(*window.popleft())

    def _submit(self, chunk: list[TextItem]) -> Future[np.ndarray]:
        texts = [it.text for it in chunk if it.error is None and it.text is not None]
        if not texts:
            return completed(np.zeros, (0, 0), np.float32)
        return self.engine.submit_texts(texts)  # (N, D); warns for each text it truncates

    def _collect(self, chunk: list[TextItem], fut: Future[np.ndarray]) -> list[TextOutcome]:
        t = time.perf_counter()
        emb = fut.result()
        self.wait_s += time.perf_counter() - t
        kill_point("embedded")
        return text_rows(self.engine, chunk, emb)


def text_rows(engine: Engine, chunk: list[TextItem], emb: np.ndarray) -> list[TextOutcome]:
    """``chunk``'s rows in order, given ``emb`` (K, D): the embeddings of its K embeddable texts, in order."""
    good = [it for it in chunk if it.error is None and it.text is not None]
    loaded = engine.loaded
    known = truncated(loaded.tokenizer, [str(it.text) for it in good], loaded.info.context_length)
    cut: Sequence[bool | None] = known if known is not None else [None] * len(good)
    rows = {it.index: (emb[i], cut[i]) for i, it in enumerate(good)}
    return [TextOutcome(it.index, it.text, it.sha256, *rows[it.index]) if it.index in rows
            else TextOutcome(it.index, it.text, it.sha256, error_message=it.error) for it in chunk]


def text_schema(dim: int) -> pa.Schema:
    """The Arrow schema of every part and of the final file of a text job."""
    return pa.schema([
        pa.field("index", pa.int64(), nullable=False),
        pa.field("text", pa.string()),
        pa.field("text_sha256", pa.string()),
        pa.field("status", pa.string(), nullable=False),
        pa.field("error_type", pa.string()),
        pa.field("error_message", pa.string()),
        pa.field("truncated", pa.bool_()),
        pa.field("embedding", pa.list_(pa.float32(), dim)),
    ])


def text_table(rows: Sequence[TextOutcome], schema: pa.Schema) -> pa.Table:
    """One part's rows as Arrow (embeddings copied bitwise)."""
    dim = schema.field("embedding").type.list_size
    data: dict[str, Any] = {
        "index": [r.index for r in rows],
        "text": [r.text for r in rows],
        "text_sha256": [r.sha256 for r in rows],
        "status": ["ok" if r.ok else "error" for r in rows],
        "error_type": [r.error_type for r in rows],
        "error_message": [r.error_message for r in rows],
        "truncated": [r.truncated for r in rows],
        "embedding": fixed_list([r.embedding for r in rows], dim, pa.float32()),
    }
    return table_from_columns(data, schema)


def run_text_batch(
    inputs: str | os.PathLike[str],
    engine: Engine,
    *,
    out: str | os.PathLike[str],
    text_column: str | None = None,
    part_size: int = DEFAULT_PART_SIZE,
    restart: bool = False,
    progress: Callable[[BatchProgress], None] | None = None,
    backend: str = "local",
    address: str | None = None,
    workers: int | None = None,
    verbose: bool = False,
) -> BatchSummary:
    """Embed every text of a text file (one per line) or of a CSV/Parquet column into one Parquet file.

    Every line or cell gets exactly one row (row ``i`` is line ``i + 1``); a blank, non-UTF-8 or
    missing text is an ``error`` row (``TextInputError``); a text longer than the model's context is
    truncated, with a warning, and flagged ``truncated``. A killed job resumes where it stopped when
    run again with the same arguments, and writes the same file byte for byte.

    Args:
        inputs: a text file (any suffix but .csv/.parquet/.pq: one text per line), or a CSV/Parquet file.
        engine: a :class:`steadyclip.Engine`; its replicas embed the texts.
        out: the Parquet file to write.
        text_column: the CSV/Parquet column holding the texts (default ``"text"``).
        part_size: rows per part file (the resume granularity).
        restart: discard an unfinished or finished earlier job at ``out`` instead of refusing.
        progress: called with a :class:`BatchProgress` after each chunk.
        backend: ``"local"`` (this engine's replicas) or ``"ray"`` (Ray Data actors, each a verified
            copy of this engine; the same rows, bit for bit).
        address: the Ray cluster (ray only; default: start a local Ray and stop it afterwards).
        workers: model actors (ray only; default: one per ``engine.threads`` CPUs of the cluster).
        verbose: let Ray's own logs through (they are quiet by default).
    Returns:
        A :class:`BatchSummary` (``inputs="texts"``).
    Raises:
        BatchJobError: a missing file or column, no texts at all, or a resume that would mix two jobs.
        InputError: an unknown ``backend``, or ``workers``/``address`` without ``backend="ray"``.

    Example:
        >>> engine = steadyclip.Engine(steadyclip.load())
        >>> run_text_batch("captions.txt", engine, out="captions.parquet").ok
        3
    """
    t0 = time.perf_counter()
    _check_backend(backend, address, workers)
    source = open_texts(inputs, column=text_column)
    inputs_sha, n = source.fingerprint()
    if n == 0:
        raise BatchJobError(f"no texts in {source.description!r}: the file is empty; give one text per line "
                            "(or rows in the text column)")
    schema = text_schema(int(engine.embedding_dim))
    provenance = identity.file_provenance(engine.provenance.to_dict())
    job = _job_spec(engine, provenance, inputs_sha, n, source, part_size)
    store = PartStore(out, job, part_size=part_size)
    with store.locked():
        state = store.open(restart=restart)
        if state.complete:
            meta = read_metadata(store.out)
            _logger.info("%s already holds this job; nothing to do", store.out)
            return BatchSummary(store.out, n, meta["ok"], meta["errors"], n, 0, time.perf_counter() - t0, 0.0, 0.0,
                                backend, workers or engine.replicas, engine.threads, engine.text_micro_batch, True, provenance,
                                inputs="texts")
        pipeline = _pipeline(engine, backend, address, workers, verbose)
        hasher = TextListingHasher()
        write_parts(store, state, pipeline, hasher.watch(source), lambda rows: text_table(rows, schema), n,
                    progress)
        check_listing(hasher.digest(), (inputs_sha, n), source.description)
        metadata = {"format": "steadyclip-batch", "inputs": "texts", "provenance": provenance,
                    "text_column": source.column, "columns": [f.name for f in schema]}
        ok, errors = store.assemble(schema, metadata)
    elapsed = time.perf_counter() - t0
    _logger.info("text batch done: %d rows (%d ok, %d errors) in %.1fs -> %s", n, ok, errors, elapsed, store.out)
    return BatchSummary(store.out, n, ok, errors, state.done_rows, n - state.done_rows, elapsed, pipeline.model_s,
                        pipeline.wait_s, backend, pipeline.workers, engine.threads, engine.text_micro_batch, False,
                        provenance, execution(engine, pipeline), inputs="texts")


def _check_backend(backend: str, address: str | None, workers: int | None) -> None:
    if backend not in ("local", "ray"):
        raise InputError(f"backend must be 'local' or 'ray', got {backend!r}")
    if backend == "local" and (address is not None or workers is not None):
        raise InputError("address and workers apply to backend='ray'; a local text job runs on the engine's "
                         "replicas (EngineSettings.replicas / --replicas)")


def _pipeline(engine: Engine, backend: str, address: str | None, workers: int | None,
              verbose: bool) -> TextPipeline | RayTextPipeline:
    if backend == "ray":
        from steadyclip.batch.ray_texts import RayTextPipeline

        return RayTextPipeline(engine, functools.partial(text_rows, engine), address=address, actors=workers,
                               verbose=verbose)
    return TextPipeline(engine)


def _job_spec(engine: Engine, provenance: dict[str, Any], inputs_sha: str, n: int, source: TextSource,
              part_size: int) -> JobSpec:
    """What a resumed text job must agree on: the texts, the model, the numerics, the shapes, the layout of parts."""
    result = identity.result_identity(provenance, engine.numerics_basis())
    options = {"inputs": "texts", "text_column": source.column, "part_size": part_size,
               **{k: v for k, v in result.items() if k not in MODEL_KEYS}}
    return JobSpec(inputs_sha256=inputs_sha, n_inputs=n, model={k: result[k] for k in MODEL_KEYS},
                   labels_sha256=None, templates_sha256=None, options=options,
                   description={"inputs": source.description, "kind": f"texts:{source.kind}"})
