"""Batch jobs: a folder, glob or manifest in, one crash-safe, resumable Parquet file out.

    >>> from steadyclip.batch import run_batch
    >>> summary = run_batch("photos/", engine, labels=["cat", "dog"], out="photos.parquet")
    >>> summary.ok, summary.errors, round(summary.items_per_s, 1)

See ``runner`` for the flow, ``writer`` for the on-disk layout and crash safety,
``table`` for the output columns, ``inputs`` for what counts as an input.
"""
from __future__ import annotations

from steadyclip.batch.inputs import InputItem, InputSource, open_inputs
from steadyclip.batch.runner import (
    BatchProgress,
    BatchSummary,
    default_workers,
    run_batch,
)
from steadyclip.batch.throughput import ThroughputReport, measure_throughput
from steadyclip.batch.writer import read_metadata

__all__ = [
    "BatchProgress",
    "BatchSummary",
    "InputItem",
    "InputSource",
    "ThroughputReport",
    "default_workers",
    "measure_throughput",
    "open_inputs",
    "read_metadata",
    "run_batch",
]
