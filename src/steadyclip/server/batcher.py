"""One worker thread owns the engine; image rows from concurrent requests share forwards.

Requests hand preprocessed image tensors to :meth:`Batcher.submit_pixels`. The
worker takes the first waiting job, gathers more until it holds ``max_rows``
rows or ``max_wait_s`` has passed, runs *one* ``engine.embed_pixels`` over them
and hands each request back its own rows. This is safe for reproducibility
because the engine runs every forward at a fixed micro-batch shape (or has
proved single rows bitwise equal to batched ones): a row never depends on its
neighbours, so a request gets the same bits however it was batched.

Everything else that touches the engine (text embeddings, the zero-shot head,
provenance) runs on the same thread through :meth:`Batcher.submit_call`, so
the engine is never used from two threads at once.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import torch

from steadyclip.errors import InputError

_logger = logging.getLogger(__name__)

T = TypeVar("T")


class Overloaded(Exception):
    """The job queue is full; the caller should answer 429 with Retry-After."""


@dataclass
class _PixelJob:
    pixels: torch.Tensor  # (n, 3, H, W)
    future: Future[np.ndarray] = field(default_factory=Future)


@dataclass
class _CallJob:
    fn: Callable[[], Any]
    future: Future[Any] = field(default_factory=Future)


_STOP = object()


@dataclass
class BatchStats:
    """Counters for observability and tests (read without the worker's cooperation)."""

    batches: int = 0
    rows: int = 0
    largest: int = 0
    calls: int = 0
    cancelled: int = 0

    def to_dict(self) -> dict[str, int]:
        return {"batches": self.batches, "rows": self.rows, "largest_batch": self.largest, "calls": self.calls,
                "cancelled": self.cancelled}


class Batcher:
    """Micro-batching front of an engine-like object with ``embed_pixels(N,3,H,W) -> (N, D)``.

    Args:
        engine: the :class:`~steadyclip.engine.Engine` (only this object's thread calls it).
        max_rows: rows to gather before running (normally the engine's micro-batch).
        max_wait_s: how long to wait for companions when fewer than ``max_rows`` are queued.
        max_queue: queued jobs beyond which :class:`Overloaded` is raised.
    """

    def __init__(self, engine: Any, *, max_rows: int, max_wait_s: float = 0.005, max_queue: int = 1024) -> None:
        if max_rows < 1:
            raise InputError(f"max_rows must be >= 1, got {max_rows}; give the engine's micro-batch size")
        self.engine = engine
        self.max_rows = max_rows
        self.max_wait_s = max_wait_s
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max_queue)
        self._thread: threading.Thread | None = None
        self.stats = BatchStats()
        self.on_batch: Callable[[int], None] | None = None  # called with each forward's row count (metrics)

    # ---- lifecycle ----------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="steadyclip-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish queued jobs, then end the worker thread."""
        if self._thread is None:
            return
        self._queue.put(_STOP)
        self._thread.join(timeout)
        if self._thread.is_alive():
            _logger.warning("engine worker did not stop within %.0fs (a forward is still running)", timeout)
        self._thread = None

    @property
    def queue_depth(self) -> int:
        """Jobs waiting for the worker (approximate, like every queue size read from another thread)."""
        return self._queue.qsize()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ---- submission (any thread) --------------------------------------------------------
    def submit_pixels(self, pixels: torch.Tensor) -> Future[np.ndarray]:
        """Queue preprocessed images (n, 3, H, W); the future yields their (n, D) embeddings."""
        if pixels.ndim != 4 or pixels.shape[0] < 1:
            raise InputError(f"pixels must be (n>=1, 3, H, W), got {tuple(pixels.shape)}; preprocess the images "
                             "with the model's transform and stack them")
        job = _PixelJob(pixels)
        self._put(job)
        return job.future

    def submit_call(self, fn: Callable[[], T]) -> Future[T]:
        """Run ``fn()`` on the engine thread (between micro-batches)."""
        job = _CallJob(fn)
        self._put(job)
        return job.future

    def _put(self, job: _PixelJob | _CallJob) -> None:
        if not self.running:
            raise RuntimeError("the engine worker is not running (server starting up or shutting down)")
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise Overloaded(f"{self._queue.maxsize} engine jobs already queued") from None

    # ---- the worker ---------------------------------------------------------------------
    def _run(self) -> None:
        _logger.debug("engine worker started (max_rows=%d, max_wait=%.1fms)", self.max_rows, self.max_wait_s * 1e3)
        while True:
            job = self._queue.get()
            if job is _STOP:
                break
            if isinstance(job, _CallJob):
                self._run_call(job)
                continue
            batch, deferred, stop = self._gather(job)
            self._run_batch(batch)
            for call in deferred:
                self._run_call(call)
            if stop:
                break
        _logger.debug("engine worker stopped")

    def _gather(self, first: _PixelJob) -> tuple[list[_PixelJob], list[_CallJob], bool]:
        """Collect pixel jobs behind ``first`` up to ``max_rows`` rows or the wait deadline."""
        batch: list[_PixelJob] = [first]
        deferred: list[_CallJob] = []
        rows = first.pixels.shape[0]
        deadline = time.monotonic() + self.max_wait_s
        while rows < self.max_rows:
            remaining = deadline - time.monotonic()
            try:
                nxt = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if nxt is _STOP:
                return batch, deferred, True
            if isinstance(nxt, _CallJob):
                deferred.append(nxt)  # keeps its place relative to other calls; runs after this batch
                continue
            batch.append(nxt)
            rows += nxt.pixels.shape[0]
        return batch, deferred, False

    def _run_batch(self, batch: list[_PixelJob]) -> None:
        live = [j for j in batch if j.future.set_running_or_notify_cancel()]
        self.stats.cancelled += len(batch) - len(live)
        if not live:
            return
        try:
            pixels = torch.cat([j.pixels for j in live], dim=0)  # (sum n, 3, H, W)
            emb = self.engine.embed_pixels(pixels)  # (sum n, D)
        except BaseException as e:  # noqa: BLE001 - every waiter must hear about the failure
            for j in live:
                j.future.set_exception(e)
            return
        self.stats.batches += 1
        self.stats.rows += int(pixels.shape[0])
        self.stats.largest = max(self.stats.largest, int(pixels.shape[0]))
        if self.on_batch is not None:
            self.on_batch(int(pixels.shape[0]))
        offset = 0
        for j in live:
            n = j.pixels.shape[0]
            j.future.set_result(np.ascontiguousarray(emb[offset : offset + n]))
            offset += n

    def _run_call(self, job: _CallJob) -> None:
        if not job.future.set_running_or_notify_cancel():
            self.stats.cancelled += 1
            return
        try:
            result = job.fn()
        except BaseException as e:  # noqa: BLE001
            job.future.set_exception(e)
            return
        self.stats.calls += 1
        job.future.set_result(result)
