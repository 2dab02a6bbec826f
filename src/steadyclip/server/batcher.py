"""Micro-batching in front of the engine: concurrent requests share forwards, every replica busy.

Two threads own the engine:

- the *batch* thread takes row jobs (preprocessed pixels, uploaded image bytes, or texts) from its
  queue, gathers jobs of one kind into one micro-batch (up to ``max_rows`` rows) and hands it to
  the engine without waiting for the result (``engine.submit_pixels``, ``images_fn``,
  ``texts_fn``), so while K replicas compute, the next micro-batch is already being gathered.
  At most ``in_flight`` micro-batches run at once (one per replica); each request gets its own
  rows back.
- the *call* thread runs everything else that touches the engine (class embeddings, the
  zero-shot head, token counts), one call at a time, in order, never behind a forward: a
  request's class embeddings are ready when its pixels are.

Admission: a job whose estimated wait (the rows queued ahead of it, at the measured time per
micro-batch, spread over the replicas) exceeds ``timeout_s`` is refused at once with
:class:`Overloaded` (the server's 429 + ``Retry-After``), never queued to time out later.

Reproducibility does not depend on how rows are batched: the engine runs every
forward at its fixed micro-batch shape (or has proved single rows bitwise equal to
batched ones), so a row never depends on its neighbours.

How long to wait for companions: a partial micro-batch is padded to the full shape,
so it costs as much as a full one. When nothing is running, a job waits at most
``max_wait_s`` (latency first). When the rows in flight plus those answered within the
last forward's time would fill a micro-batch, the server is under load (those clients
are about to send more), and the batch thread waits up to a quarter of a forward's
measured time for the micro-batch to fill: a little latency for many times the throughput.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import numpy as np
import torch

from steadyclip._util.futures import completed
from steadyclip.errors import InputError

_logger = logging.getLogger(__name__)

T = TypeVar("T")

BUSY_WAIT_FRACTION = 0.25  # of a forward's time: how long a job may wait for companions under load


class PixelEngine(Protocol):
    """What the batcher needs of an engine (an :class:`~steadyclip.engine.Engine`, or a test's stand-in)."""

    def embed_pixels(self, pixels: torch.Tensor) -> np.ndarray: ...


class Overloaded(Exception):
    """The queue is full or its wait exceeds the timeout; the caller should answer 429 with Retry-After."""

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass
class _RowsJob:
    kind: str  # "pixels": a (n, 3, H, W) tensor; "images": n uploaded files' bytes; "texts": n strings
    items: Any
    rows: int
    future: Future[Any] = field(default_factory=Future)
    queued: float = field(default_factory=time.monotonic)


@dataclass
class _CallJob:
    fn: Callable[[], Any]
    future: Future[Any] = field(default_factory=Future)


_STOP = object()


@dataclass
class BatchStats:
    """Counters for observability and tests (read without the workers' cooperation)."""

    batches: int = 0
    rows: int = 0
    largest: int = 0
    calls: int = 0
    cancelled: int = 0

    def to_dict(self) -> dict[str, int]:
        return {"batches": self.batches, "rows": self.rows, "largest_batch": self.largest, "calls": self.calls,
                "cancelled": self.cancelled}


class Batcher:
    """Micro-batching front of an engine with ``embed_pixels`` (and, to overlap, ``submit_pixels``).

    Args:
        engine: the :class:`~steadyclip.engine.Engine`. ``engine.submit_pixels(pixels)`` (a future
            of (n, D)) is used when present, else ``engine.embed_pixels(pixels)`` on the batch thread.
        max_rows: rows per micro-batch (normally the engine's micro-batch).
        max_wait_s: how long a job waits for companions when nothing else is running.
        max_queue: queued jobs beyond which :class:`Overloaded` is raised.
        in_flight: micro-batches running at once (normally the engine's replicas).
        images_fn: for :meth:`submit_images`: uploaded files' bytes -> a future of one row each
            (the server decodes and embeds them in the replicas: ``Engine.embed_uploads``).
        texts_fn: for :meth:`submit_texts`: strings -> a future of their (n, D) embeddings
            (the server embeds them in the replicas: ``Engine.submit_texts``).
        timeout_s: a job expected to wait longer than this is refused (:class:`Overloaded`).
        text_rows: rows of texts per micro-batch (normally the engine's rows at its shortest text bucket).
    """

    def __init__(self, engine: PixelEngine, *, max_rows: int, max_wait_s: float = 0.005, max_queue: int = 1024,
                 in_flight: int = 1, images_fn: Callable[[list[bytes]], Future[list[Any]]] | None = None,
                 texts_fn: Callable[[list[str]], Future[np.ndarray]] | None = None,
                 timeout_s: float | None = None, text_rows: int | None = None) -> None:
        if max_rows < 1 or in_flight < 1:
            raise InputError(f"max_rows and in_flight must be >= 1, got {max_rows} and {in_flight}; give the engine's "
                             "micro-batch size and replica count")
        self.engine = engine
        self.max_rows = max_rows
        self.max_wait_s = max_wait_s
        self.in_flight = in_flight
        self.images_fn = images_fn
        self.texts_fn = texts_fn
        self.text_rows = text_rows or max_rows
        self.timeout_s = timeout_s
        self._queued_rows = 0  # rows of the row jobs waiting in the queue
        self._held: _RowsJob | None = None  # a job of the other kind that ended the last gather
        self._pixels: queue.Queue[Any] = queue.Queue(maxsize=max_queue)
        self._calls: queue.Queue[Any] = queue.Queue(maxsize=max_queue)
        self._slots = threading.BoundedSemaphore(in_flight)
        self._lock = threading.Lock()
        self._running_rows = 0  # rows of the micro-batches in flight
        self._running_batches = 0  # micro-batches in flight
        self._forward_s = 0.0  # moving average of a micro-batch's time, for the wait under load
        self._kind_s: dict[str, float] = {}  # the same, per job kind (admission estimates)
        self._done: deque[tuple[float, int]] = deque()  # (when, rows) of recent micro-batches
        self._threads: list[threading.Thread] = []
        self.stats = BatchStats()
        self.on_batch: Callable[[int], None] | None = None  # called with each forward's row count (metrics)

    # ---- lifecycle ----------------------------------------------------------------------
    def start(self) -> None:
        if self._threads:
            return
        self._threads = [threading.Thread(target=self._run_batches, name="steadyclip-engine", daemon=True),
                         threading.Thread(target=self._run_calls, name="steadyclip-engine-calls", daemon=True)]
        for t in self._threads:
            t.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish queued jobs (and the micro-batches in flight), then end the worker threads."""
        if not self._threads:
            return
        self._pixels.put(_STOP)
        self._calls.put(_STOP)
        for t in self._threads:
            t.join(timeout)
            if t.is_alive():
                _logger.warning("engine worker %s did not stop within %.0fs (a forward is still running)",
                                t.name, timeout)
        self._threads = []

    @property
    def queue_depth(self) -> int:
        """Jobs waiting for the workers (approximate, like every queue size read from another thread)."""
        return self._pixels.qsize() + self._calls.qsize()

    @property
    def running(self) -> bool:
        return bool(self._threads) and all(t.is_alive() for t in self._threads)

    # ---- submission (any thread) --------------------------------------------------------
    def submit_pixels(self, pixels: torch.Tensor) -> Future[np.ndarray]:
        """Queue preprocessed images (n, 3, H, W); the future yields their (n, D) embeddings."""
        if pixels.ndim != 4 or pixels.shape[0] < 1:
            raise InputError(f"pixels must be (n>=1, 3, H, W), got {tuple(pixels.shape)}; preprocess the images "
                             "with the model's transform and stack them")
        job = _RowsJob("pixels", pixels, int(pixels.shape[0]))
        self._put(self._pixels, job)
        return job.future

    def submit_images(self, datas: list[bytes]) -> Future[list[Any]]:
        """Queue uploaded images' bytes; the future yields one row per image (see ``images_fn``)."""
        if self.images_fn is None or not datas:
            raise InputError("submit_images needs an images_fn and at least one image")
        job = _RowsJob("images", list(datas), len(datas))
        self._put(self._pixels, job)
        return job.future

    def submit_texts(self, texts: list[str]) -> Future[np.ndarray]:
        """Queue texts; the future yields their (n, D) embeddings (see ``texts_fn``)."""
        if self.texts_fn is None or not texts:
            raise InputError("submit_texts needs a texts_fn and at least one text")
        job = _RowsJob("texts", list(texts), len(texts))
        self._put(self._pixels, job)
        return job.future

    def submit_call(self, fn: Callable[[], T]) -> Future[T]:
        """Run ``fn()`` on the engine's call thread (in order with other calls)."""
        job = _CallJob(fn)
        self._put(self._calls, job)
        return job.future

    def _put(self, q: queue.Queue[Any], job: _RowsJob | _CallJob) -> None:
        if not self.running:
            raise RuntimeError("the engine worker is not running (server starting up or shutting down)")
        if isinstance(job, _RowsJob):
            self._admit(job)
        try:
            q.put_nowait(job)
        except queue.Full:
            raise Overloaded(f"{q.maxsize} engine jobs already queued") from None
        if isinstance(job, _RowsJob):
            with self._lock:
                self._queued_rows += job.rows

    def expected_wait_s(self, kind: str, rows: int) -> float:
        """How long ``rows`` more rows of ``kind`` would wait for their answer, at the measured pace."""
        with self._lock:
            per_batch = self._kind_s.get(kind, self._forward_s)
            ahead = self._queued_rows + self._running_rows + rows
        batches = -(-ahead // (self.text_rows if kind == "texts" else self.max_rows))  # ceil
        return batches * per_batch / self.in_flight

    def _admit(self, job: _RowsJob) -> None:
        if self.timeout_s is None:
            return
        wait = self.expected_wait_s(job.kind, job.rows)
        if wait > self.timeout_s:
            raise Overloaded(f"the work queued ahead would take about {wait:.1f}s, over the {self.timeout_s:g}s "
                             "request timeout", retry_after_s=max(1.0, wait - self.timeout_s))

    # ---- the call thread ----------------------------------------------------------------
    def _run_calls(self) -> None:
        while (job := self._calls.get()) is not _STOP:
            if not job.future.set_running_or_notify_cancel():
                self._count(cancelled=1)
                continue
            try:
                result = job.fn()
            except BaseException as e:  # noqa: BLE001 - the waiter hears about it
                job.future.set_exception(e)
                continue
            self._count(calls=1)
            job.future.set_result(result)

    # ---- the batch thread ---------------------------------------------------------------
    def _run_batches(self) -> None:
        _logger.debug("batch worker started (max_rows=%d, in_flight=%d, max_wait=%.1fms)", self.max_rows,
                      self.in_flight, self.max_wait_s * 1e3)
        stop = False
        while not stop:
            job, self._held = (self._held, None) if self._held is not None else (self._dequeued(self._pixels.get()), None)
            if job is _STOP:
                break
            self._slots.acquire()  # a replica is free; rows keep queueing meanwhile
            batch, stop = self._gather(job)
            self._dispatch(batch)
        for _ in range(self.in_flight):  # wait for the micro-batches still running
            self._slots.acquire()
        _logger.debug("batch worker stopped")

    def wait_s(self) -> float:
        """How long a job arriving now would wait for companions (seconds).

        ``max_wait_s``, or longer under load: when the rows in flight and those answered within the
        last forward's time fill a micro-batch, their clients are about to send more (a lone
        sequential client never waits for companions it does not have).
        """
        now = time.monotonic()
        with self._lock:
            while self._done and now - self._done[0][0] > self._forward_s:
                self._done.popleft()
            demand = self._running_rows + sum(rows for _, rows in self._done)
            forward_s = self._forward_s
        return max(self.max_wait_s, BUSY_WAIT_FRACTION * forward_s) if demand >= self.max_rows else self.max_wait_s

    def _gather(self, first: _RowsJob) -> tuple[list[_RowsJob], bool]:
        """Collect jobs of ``first``'s kind behind it, up to ``max_rows`` rows or the wait deadline."""
        batch = [first]
        limit, wait = self._text_gather() if first.kind == "texts" else (self.max_rows, self.wait_s())
        rows = first.rows
        # From when a replica became free: a job that waited for one has companions on their way
        # (the clients just answered), so it still gets its chance to fill the micro-batch.
        deadline = max(first.queued, time.monotonic() - self.max_wait_s) + wait
        while rows < limit:
            remaining = deadline - time.monotonic()
            try:
                nxt = self._dequeued(self._pixels.get(timeout=remaining) if remaining > 0 else self._pixels.get_nowait())
            except queue.Empty:
                break
            if nxt is _STOP:
                return batch, True
            if nxt.kind != first.kind:
                self._held = nxt  # starts the next micro-batch
                break
            batch.append(nxt)
            rows += nxt.rows
        return batch, False

    def _text_gather(self) -> tuple[int, float]:
        """(rows, wait) for a text micro-batch: ``text_rows`` and :meth:`wait_s` while every other
        replica is busy; while one is idle, half the rows and no wait for companions, so the replicas
        overlap instead of running lock-step rounds (a text forward runs at a proven multiple of the
        engine's base rows, so a smaller one pads fewer than the base rows)."""
        with self._lock:
            idle = self._running_batches < self.in_flight - 1
        return (max(1, self.text_rows // 2), self.max_wait_s) if idle else (self.text_rows, self.wait_s())

    def _dequeued(self, job: Any) -> Any:
        if isinstance(job, _RowsJob):
            with self._lock:
                self._queued_rows -= job.rows
        return job

    def _dispatch(self, batch: list[_RowsJob]) -> None:
        live = [j for j in batch if j.future.set_running_or_notify_cancel()]
        self._count(cancelled=len(batch) - len(live))
        if not live:
            self._slots.release()
            return
        with self._lock:
            self._running_rows += sum(j.rows for j in live)
            self._running_batches += 1
        t0 = time.monotonic()
        try:
            fut = self._submit(live)
        except BaseException as e:  # noqa: BLE001 - every waiter must hear about the failure
            fut = Future()
            fut.set_exception(e)
        fut.add_done_callback(lambda f: self._finish(live, t0, f))

    def _submit(self, live: list[_RowsJob]) -> Future[Any]:
        if live[0].kind == "images":
            assert self.images_fn is not None
            return self.images_fn([data for j in live for data in j.items])
        if live[0].kind == "texts":
            assert self.texts_fn is not None
            return self.texts_fn([text for j in live for text in j.items])
        pixels = torch.cat([j.items for j in live], dim=0)  # (sum n, 3, H, W)
        submit = getattr(self.engine, "submit_pixels", None)
        return submit(pixels) if submit is not None else completed(self.engine.embed_pixels, pixels)

    def _finish(self, live: list[_RowsJob], t0: float, fut: Future[Any]) -> None:
        """A micro-batch is done (on whichever thread completed it): hand out rows, free the slot."""
        try:
            rows = sum(j.rows for j in live)
            err = fut.exception()
            if err is not None:
                for j in live:
                    j.future.set_exception(err)
                return
            emb = fut.result()
            with self._lock:
                took = time.monotonic() - t0
                self._forward_s = took if self._forward_s == 0 else 0.8 * self._forward_s + 0.2 * took
                kind_s = self._kind_s.get(live[0].kind, 0.0)
                self._kind_s[live[0].kind] = took if kind_s == 0 else 0.8 * kind_s + 0.2 * took
                self._done.append((time.monotonic(), rows))
                self.stats.batches += 1
                self.stats.rows += rows
                self.stats.largest = max(self.stats.largest, rows)
            if self.on_batch is not None:
                self.on_batch(rows)
            offset = 0
            for j in live:
                part = emb[offset : offset + j.rows]
                j.future.set_result(part if j.kind == "images" else np.ascontiguousarray(part))
                offset += j.rows
        finally:
            with self._lock:
                self._running_rows -= sum(j.rows for j in live)
                self._running_batches -= 1
            self._slots.release()

    def _count(self, *, calls: int = 0, cancelled: int = 0) -> None:
        with self._lock:
            self.stats.calls += calls
            self.stats.cancelled += cancelled

