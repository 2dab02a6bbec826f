"""Batch jobs: a folder, glob or manifest in, one crash-safe, resumable Parquet file out.

    >>> from steadyclip.batch import run_batch, run_text_batch
    >>> summary = run_batch("photos/", engine, labels=["cat", "dog"], out="photos.parquet")
    >>> summary.ok, summary.errors, round(summary.items_per_s, 1)
    >>> run_text_batch("queries.txt", engine, out="queries.parquet").ok  # one text per line -> embeddings

See ``runner`` for the flow, ``writer`` for the on-disk layout and crash safety,
``table`` for the output columns, ``inputs`` for what counts as an input; ``text_job`` and
``text_inputs`` for text jobs (their columns, blank and non-UTF-8 lines).
"""
from __future__ import annotations

from steadyclip.batch.inputs import InputItem, InputSource, open_inputs
from steadyclip.batch.runner import (
    BatchProgress,
    BatchSummary,
    default_workers,
    run_batch,
)
from steadyclip.batch.text_inputs import TextItem, TextSource, open_texts
from steadyclip.batch.text_job import run_text_batch
from steadyclip.batch.throughput import ThroughputReport, measure_throughput
from steadyclip.batch.writer import read_metadata

__all__ = [
    "BatchProgress",
    "BatchSummary",
    "InputItem",
    "InputSource",
    "TextItem",
    "TextSource",
    "ThroughputReport",
    "default_workers",
    "measure_throughput",
    "open_inputs",
    "open_texts",
    "read_metadata",
    "run_batch",
    "run_text_batch",
]
