"""``run_batch``: a folder or manifest in, one crash-safe Parquet file out.

Flow (local backend)::

    listing (streamed) --> decoder processes (read, sha256, decode, preprocess; bounded prefetch)
        --> model in this process (fixed-shape micro-batches) --> zero-shot head
        --> part files every ``part_size`` rows --> final file, assembled atomically

The Ray backend (``steadyclip.batch.ray_backend``) replaces the middle two stages;
listing, parts, journal and assembly are the same code.
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pyarrow as pa

from steadyclip._util.digest import sha256_array
from steadyclip.batch import _prep
from steadyclip.batch._job import (
    MODEL_KEYS,
    BatchProgress,
    BatchSummary,
    check_listing,
    execution,
    write_parts,
)
from steadyclip.batch.inputs import InputSource, ListingHasher, open_inputs
from steadyclip.batch.local import LocalPipeline
from steadyclip.batch.replicated import ReplicaPipeline
from steadyclip.batch.table import Columns, build_table, make_schema
from steadyclip.batch.writer import JobSpec, PartStore, StoreState, read_metadata
from steadyclip.engine.layout import usable_cpus
from steadyclip.engine.outcome import ImageOutcome
from steadyclip.engine.prompts import TemplateSet, get_template_set, validate_labels
from steadyclip.engine.recipe import recipe
from steadyclip.errors import BatchJobError, InputError
from steadyclip.numerics import identity

if TYPE_CHECKING:
    from steadyclip.engine import Engine

_logger = logging.getLogger(__name__)

__all__ = ["BatchProgress", "BatchSummary", "default_workers", "run_batch"]

Backend = Literal["local", "ray"]
DEFAULT_PART_SIZE = 1000


def default_workers() -> int:
    """Decoder processes: one per usable CPU (affinity, cgroup quota) left after the model's, 1 to 8."""
    return max(1, min(8, usable_cpus() - 1))


def run_batch(
    inputs: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    engine: Engine,
    *,
    out: str | os.PathLike[str],
    labels: Sequence[str] | None = None,
    templates: str | Sequence[str] | TemplateSet | None = None,
    top_k: int = 5,
    all_probs: bool = False,
    embeddings: bool = False,
    backend: Backend = "local",
    workers: int | None = None,
    part_size: int = DEFAULT_PART_SIZE,
    restart: bool = False,
    start_method: str | None = None,
    max_file_bytes: int = _prep.DEFAULT_MAX_FILE_BYTES,
    ray_address: str | None = None,
    ray_actors: int | None = None,
    verbose: bool = False,
    progress: Callable[[BatchProgress], None] | None = None,
) -> BatchSummary:
    """Classify and/or embed every image of a folder, glob, manifest or list into one Parquet file.

    Every input gets exactly one row (a bad image is an ``error`` row); a killed
    job resumes where it stopped when run again with the same arguments.

    Args:
        inputs: a folder (recursive), a glob, a manifest (.csv/.parquet with a ``path`` column, or
            .txt with one path per line), or a list of paths.
        engine: a :class:`steadyclip.Engine`.
        out: the Parquet file to write.
        labels: labels to classify against (zero-shot); omit for embeddings only.
        templates: prompt templates (default ``"photo"``).
        top_k: labels kept per row in ``top_labels``/``top_probs``.
        all_probs: also write every label's probability (``probs``).
        embeddings: also write the image embedding (``embedding``).
        backend: ``"local"`` (decoder processes + this process's model) or ``"ray"``.
        workers: decoder processes (local; 0 decodes in a thread here) or Ray actors (ray).
        part_size: rows per part file (the resume granularity).
        restart: discard an unfinished or finished earlier job at ``out`` instead of refusing.
        start_method: multiprocessing start method for decoders (default "fork" where available).
        max_file_bytes: files larger than this are error rows, never read.
        ray_address: an existing Ray cluster (default: start a local one).
        ray_actors: model actors for the Ray backend (default: ``workers``, else one per CPU of the cluster).
        verbose: let Ray's own logs through (they are quiet by default).
        progress: called with a :class:`BatchProgress` after each model step.
    Returns:
        A :class:`BatchSummary`.
    Raises:
        InputError: an unknown ``backend``, ``top_k`` < 1, ``part_size`` < 1.
        BatchJobError: no inputs, unreadable manifest, or a resume that would mix two different jobs.
        LabelError, TemplateError: bad labels or templates.

    Example:
        >>> engine = steadyclip.Engine(steadyclip.load())
        >>> run_batch("photos/", engine, labels=["red circle", "blue square"], out="photos.parquet").errors
        0
    """
    t0 = time.perf_counter()
    if backend not in ("local", "ray"):
        raise InputError(f"backend must be 'local' or 'ray', got {backend!r}")
    plan = _plan(inputs, engine, labels=labels, templates=templates, top_k=top_k, all_probs=all_probs,
                 embeddings=embeddings, part_size=part_size)
    store = PartStore(out, plan.job, part_size=part_size)
    with store.locked():
        state = store.open(restart=restart)
        if state.complete:
            return _already_complete(store, plan, engine, backend, workers, t0)
        pipeline, n_workers = _pipeline(engine, backend, plan.dim, workers=workers, start_method=start_method,
                                        max_file_bytes=max_file_bytes, ray_address=ray_address,
                                        ray_actors=ray_actors, verbose=verbose)
        ok, errors = _compute(plan, store, state, pipeline, engine, progress)
    elapsed = time.perf_counter() - t0
    _logger.info("batch done: %d rows (%d ok, %d errors) in %.1fs -> %s", plan.n, ok, errors, elapsed, store.out)
    return BatchSummary(store.out, plan.n, ok, errors, state.done_rows, plan.n - state.done_rows, elapsed,
                        pipeline.model_s, pipeline.wait_s, backend, n_workers, engine.threads, engine.micro_batch,
                        False, plan.provenance, execution(engine, pipeline))


@dataclass(frozen=True)
class _Plan:
    """Everything a job computes against, settled before any part is opened."""

    source: InputSource
    inputs_sha: str
    n: int
    labels: list[str]
    tset: TemplateSet | None
    class_emb: np.ndarray | None
    dim: int  # the model's embedding width
    cols: Columns
    schema: pa.Schema
    provenance: dict[str, Any]
    job: JobSpec


def _plan(inputs: str | os.PathLike[str] | Sequence[str | os.PathLike[str]], engine: Engine, *,
          labels: Sequence[str] | None, templates: str | Sequence[str] | TemplateSet | None, top_k: int,
          all_probs: bool, embeddings: bool, part_size: int) -> _Plan:
    """Validate the request, list the inputs once and compute the label embeddings."""
    if top_k < 1:
        raise InputError(f"top_k must be >= 1, got {top_k}")
    source = open_inputs(inputs)
    clean = validate_labels(list(labels)) if labels is not None else []
    if not clean and not embeddings:
        raise BatchJobError("nothing to compute: give labels to classify against, and/or ask for embeddings")
    tset = get_template_set(templates) if clean else None
    inputs_sha, n = source.fingerprint()
    if n == 0:
        raise BatchJobError(f"no images found in {source.description!r}; check the path, pattern or manifest")
    class_emb = engine.class_embeddings(clean, tset) if tset is not None else None
    dim = _embedding_dim(engine, class_emb)
    cols = Columns(labels=tuple(clean), top_k=top_k, all_probs=all_probs, embedding_dim=dim if embeddings else None)
    provenance = identity.file_provenance(engine.provenance.to_dict())
    if tset is not None:
        provenance |= {"template_set": tset.name, "template_sha256": tset.sha256}
    job = _job_spec(inputs_sha, n, identity.result_identity(provenance, engine.numerics_basis()), clean, tset, cols,
                    part_size, source, class_emb)
    return _Plan(source, inputs_sha, n, clean, tset, class_emb, dim, cols, make_schema(cols), provenance, job)


def _already_complete(store: PartStore, plan: _Plan, engine: Engine, backend: str, workers: int | None,
                      t0: float) -> BatchSummary:
    meta = read_metadata(store.out)
    _logger.info("%s already holds this job; nothing to do", store.out)
    return BatchSummary(store.out, plan.n, meta["ok"], meta["errors"], plan.n, 0, time.perf_counter() - t0, 0.0,
                        0.0, backend, default_workers() if workers is None else workers, engine.threads,
                        engine.micro_batch, True, plan.provenance)


def _pipeline(engine: Engine, backend: str, dim: int, *, workers: int | None, start_method: str | None,
              max_file_bytes: int, ray_address: str | None, ray_actors: int | None,
              verbose: bool) -> tuple[Any, int]:
    """The model stage for ``backend``, and how many workers it runs."""
    n_workers = default_workers() if workers is None else workers
    if backend == "ray":
        from steadyclip.batch.ray_backend import RayPipeline

        return RayPipeline(engine, dim=dim, address=ray_address, actors=ray_actors or workers or None,
                           max_file_bytes=max_file_bytes, verbose=verbose), n_workers
    if workers is None and engine.replicas > 1:
        replicated = ReplicaPipeline(engine, max_file_bytes=max_file_bytes)
        return replicated, replicated.workers
    return LocalPipeline(engine, workers=n_workers, start_method=start_method,
                         max_file_bytes=max_file_bytes), n_workers


def _compute(plan: _Plan, store: PartStore, state: StoreState, pipeline: Any, engine: Engine,
             progress: Callable[[BatchProgress], None] | None) -> tuple[int, int]:
    """Compute the missing parts, check the listing did not change meanwhile, assemble; (ok, errors)."""
    hasher = ListingHasher()

    def to_table(rows: list[ImageOutcome]) -> pa.Table:
        return build_table(rows, plan.cols, plan.schema, engine=engine, class_emb=plan.class_emb, templates=plan.tset)

    write_parts(store, state, pipeline, hasher.watch(plan.source), to_table, plan.n, progress)
    check_listing(hasher.digest(), (plan.inputs_sha, plan.n), plan.source.description)
    metadata = {"format": "steadyclip-batch", "provenance": plan.provenance, "labels": list(plan.labels),
                "templates": list(plan.tset.templates) if plan.tset is not None else None,
                "columns": [f.name for f in plan.schema], "recipe": recipe(engine)}
    return store.assemble(plan.schema, metadata)


def _embedding_dim(engine: Engine, class_emb: np.ndarray | None) -> int:
    if class_emb is not None:
        return int(class_emb.shape[1])
    return int(engine.embedding_dim)  # read from the model: no text forward just to learn D


def _job_spec(inputs_sha: str, n: int, result: dict[str, Any], labels: list[str], tset: TemplateSet | None,
              cols: Columns, part_size: int, source: InputSource, class_emb: np.ndarray | None) -> JobSpec:
    """``result`` is ``identity.result_identity``: a resumed job must compute exactly like the first run."""
    options = {
        "top_k": cols.top_k, "all_probs": cols.all_probs, "embeddings": cols.embedding_dim is not None,
        "part_size": part_size, **{k: v for k, v in result.items() if k not in MODEL_KEYS},
    }
    return JobSpec(inputs_sha256=inputs_sha, n_inputs=n, model={k: result[k] for k in MODEL_KEYS},
                   labels_sha256=identity.sha256_json(labels) if labels else None,
                   templates_sha256=tset.sha256 if tset is not None else None, options=options,
                   class_embeddings_sha256=sha256_array(class_emb)
                   if class_emb is not None else None,
                   description={"inputs": source.description, "kind": source.kind})
