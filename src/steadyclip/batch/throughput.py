"""Throughput of a batch job end to end vs the model alone, at the same micro-batch and threads.

The ratio says where a job's time goes: near 1.0 the model is the bottleneck
(decoding keeps up); well below 1.0 decoding, I/O or Parquet writing is.

Example:
    >>> r = measure_throughput(engine, "benchmarks/images/", workers=1)
    >>> print(r.summary())
"""
from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from steadyclip.batch import _prep
from steadyclip.batch.inputs import open_inputs
from steadyclip.batch.runner import default_workers, run_batch
from steadyclip.errors import InputError

if TYPE_CHECKING:
    from steadyclip.engine import Engine

_logger = logging.getLogger(__name__)

__all__ = ["ThroughputReport", "measure_throughput"]


@dataclass(frozen=True)
class ThroughputReport:
    """Images per second three ways, measured on the same images and engine."""

    images: int
    ok_images: int
    micro_batch: int
    threads: int
    workers: int
    batch_items_per_s: float  # run_batch end to end: listing, decode, model, head, Parquet
    model_items_per_s: float  # engine.embed_pixels on tensors already in memory
    decode_items_per_s: float  # read + sha256 + decode + preprocess, one process
    batch_s: float
    model_s: float

    @property
    def ratio(self) -> float:
        """End-to-end / model-only throughput (1.0: the model is the only cost)."""
        return self.batch_items_per_s / self.model_items_per_s if self.model_items_per_s else 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"ratio": self.ratio}

    def summary(self) -> str:
        return (f"batch {self.batch_items_per_s:.1f} img/s vs model-only {self.model_items_per_s:.1f} img/s "
                f"(ratio {self.ratio:.2f}; decode {self.decode_items_per_s:.1f} img/s/process) - "
                f"{self.images} images, micro-batch {self.micro_batch}, {self.threads} thread(s), "
                f"{self.workers} decoder(s)")


def measure_throughput(engine: Engine, inputs: str | os.PathLike[str] | Sequence[str | os.PathLike[str]], *,
                       labels: Sequence[str] | None = None, workers: int | None = None,
                       part_size: int = 1000) -> ThroughputReport:
    """Time ``run_batch`` on ``inputs`` and the model alone on the same decoded images.

    Args:
        engine: the engine to measure (its micro-batch and threads apply to both timings).
        inputs: what ``run_batch`` accepts; every image is decoded once in memory, so keep it modest.
        labels: classify against these (default: embeddings only).
        workers: decoder processes for the batch run (default: :func:`default_workers`).
        part_size: rows per part file in the batch run.
    """
    import numpy as np
    import torch

    items = list(open_inputs(inputs))
    n_workers = default_workers() if workers is None else workers
    transform = engine.loaded.preprocess
    _ = engine.provenance  # run the engine's one-time self-checks before any clock starts

    t = time.perf_counter()
    prepared = [_prep.prepare(item, transform) for item in items]
    decode_s = time.perf_counter() - t
    pixels = [px for _, px in prepared if px is not None]
    if not pixels:
        raise InputError("none of the inputs decoded; give real images to measure")
    stacked = torch.from_numpy(np.stack(pixels))  # (N, 3, H, W)
    engine.embed_pixels(stacked[: engine.micro_batch])  # warm-up
    t = time.perf_counter()
    engine.embed_pixels(stacked)
    model_s = time.perf_counter() - t

    with tempfile.TemporaryDirectory(prefix="steadyclip-bench-") as tmp:
        summary = run_batch([it.location for it in items], engine, out=Path(tmp) / "bench.parquet",
                            labels=labels, embeddings=not labels, workers=n_workers, part_size=part_size)
    report = ThroughputReport(
        images=len(items), ok_images=len(pixels), micro_batch=engine.micro_batch, threads=engine.threads,
        workers=n_workers, batch_items_per_s=len(items) / summary.elapsed_s,
        model_items_per_s=len(pixels) / model_s if model_s > 0 else 0.0,
        decode_items_per_s=len(items) / decode_s if decode_s > 0 else 0.0,
        batch_s=summary.elapsed_s, model_s=model_s,
    )
    _logger.info("throughput: %s", report.summary())
    return report
