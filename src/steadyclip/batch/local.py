"""The local backend's middle stages: decoder processes feeding this process's model.

Items are decoded in a pool of worker processes (``_prep.prepare_chunk``), at most
``window`` chunks ahead of the model (bounded prefetch), and come back in input
order; the model embeds them in steps of a few fixed-shape micro-batches, with a
step always ending at a part boundary so each part can be written as soon as it is
whole. A decoder process that dies (a crashing codec, the OOM killer) is replaced,
and the chunk is retried one item at a time, so only the culprit becomes an error row.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from functools import partial
from itertools import islice
from typing import TYPE_CHECKING, Any

import numpy as np

from steadyclip.batch import _prep
from steadyclip.batch._prep import Prepared
from steadyclip.batch.inputs import InputItem
from steadyclip.batch.writer import kill_point
from steadyclip.engine.outcome import ImageOutcome
from steadyclip.errors import InputError

if TYPE_CHECKING:
    from steadyclip.engine import Engine

_logger = logging.getLogger(__name__)

__all__ = ["STEP_MICRO_BATCHES", "LocalPipeline"]

# Micro-batches per model step: amortises the engine's per-call checks (inference state, buffer
# fingerprint, flags) over several forwards; results are per row, so this never changes a number.
STEP_MICRO_BATCHES = 4


class LocalPipeline:
    """Decoder processes feeding this process's model, in input order, with bounded prefetch."""

    def __init__(self, engine: Engine, *, workers: int, start_method: str | None = None,
                 max_file_bytes: int = _prep.DEFAULT_MAX_FILE_BYTES, prefetch: int | None = None) -> None:
        if workers < 0:
            raise InputError(f"workers must be >= 0, got {workers}")
        self.engine = engine
        self.workers = workers
        methods = multiprocessing.get_all_start_methods()
        self.start_method = start_method or ("fork" if "fork" in methods else "spawn")
        self.max_file_bytes = max_file_bytes
        self.chunk = max(1, engine.micro_batch)
        self.step = STEP_MICRO_BATCHES * engine.micro_batch  # successful rows per model step
        self.window = prefetch or 2 * max(1, workers) + 2  # chunks in flight
        self.model_s = 0.0
        self.wait_s = 0.0
        self._executor: Executor | None = None

    def _new_executor(self) -> Executor:
        transform = self.engine.loaded.preprocess
        if self.workers == 0:
            return ThreadPoolExecutor(max_workers=1, thread_name_prefix="steadyclip-decode")
        ctx = multiprocessing.get_context(self.start_method)
        return ProcessPoolExecutor(max_workers=self.workers, mp_context=ctx, initializer=_prep.init_worker,
                                   initargs=(transform, self.max_file_bytes, os.getpid()))

    def _submit(self, chunk: list[InputItem]) -> Future[list[Prepared]]:
        assert self._executor is not None
        if self.workers == 0:
            fn = partial(_prepare_here, self.engine.loaded.preprocess, self.max_file_bytes)
            return self._executor.submit(fn, chunk)
        return self._executor.submit(_prep.prepare_chunk, chunk)

    def _restart(self) -> None:
        assert self._executor is not None
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._executor = self._new_executor()

    def run(self, items: Iterator[InputItem], part_size: int) -> Iterator[list[ImageOutcome]]:
        """Ordered results, one model step at a time (``self.step`` rows, or the end of a part)."""
        self._executor = self._new_executor()
        try:
            pending: list[Prepared] = []
            n_ok = 0
            for prep in self._prepared(items):
                pending.append(prep)
                outcome, pixels = prep
                n_ok += pixels is not None
                if n_ok >= self.step or (outcome.index + 1) % part_size == 0:
                    yield self._embed(pending)
                    pending, n_ok = [], 0
            if pending:
                yield self._embed(pending)
        finally:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    def _prepared(self, items: Iterator[InputItem]) -> Iterator[Prepared]:
        window: deque[tuple[list[InputItem], Future[list[Prepared]]]] = deque()
        chunks = iter(lambda: list(islice(items, self.chunk)), [])
        for chunk in chunks:
            window.append((chunk, self._submit(chunk)))
            if len(window) >= self.window:
                yield from self._collect(window)
        while window:
            yield from self._collect(window)

    def _collect(self, window: deque[tuple[list[InputItem], Future[list[Prepared]]]]) -> list[Prepared]:
        chunk, fut = window.popleft()
        t = time.perf_counter()
        try:
            return fut.result()
        except BrokenProcessPool:
            # A decoder died (a crashing codec, the OOM killer): find the file one item at a time.
            _logger.warning("a decoder process died; retrying %d items one by one", len(chunk))
            self._restart()
            out = self._isolate(chunk)
            for i, (c, _) in enumerate(window):
                window[i] = (c, self._submit(c))
            return out
        finally:
            self.wait_s += time.perf_counter() - t

    def _isolate(self, chunk: list[InputItem]) -> list[Prepared]:
        out: list[Prepared] = []
        for item in chunk:
            try:
                out.extend(self._submit([item]).result())
            except BrokenProcessPool:
                self._restart()
                died = (f"the decoder process died reading {item.path}; the file likely crashes the image "
                        "library or exhausts memory - inspect or remove it")
                out.append((ImageOutcome.failed(item.index, item.path, ("DecoderCrashError", died)), None))
        return out

    def _embed(self, batch: list[Prepared]) -> list[ImageOutcome]:
        ok = [(o.index, pixels) for o, pixels in batch if pixels is not None]
        emb: dict[int, np.ndarray] = {}
        if ok:
            t = time.perf_counter()
            vectors = self.engine.embed_pixels(_prep.pixel_batch([pixels for _, pixels in ok]))  # (N, D)
            self.model_s += time.perf_counter() - t
            emb = {index: vectors[i] for i, (index, _) in enumerate(ok)}
            kill_point("embedded")
        return [o.embedded(emb[o.index]) if o.index in emb else o for o, _ in batch]


def _prepare_here(transform: Any, max_file_bytes: int, chunk: list[InputItem]) -> list[Prepared]:
    return [_prep.prepare(item, transform, max_file_bytes) for item in chunk]
