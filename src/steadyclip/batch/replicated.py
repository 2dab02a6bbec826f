"""The local backend on every core: engine replicas that each read, decode and embed a chunk.

Each task is one micro-batch of inputs; a replica reads, hashes, decodes and
preprocesses them (``_prep.prepare``, the same code as the decoder processes and
the Ray actors), then embeds the good ones at the engine's fixed shape. So decoding
is spread over the same K processes as the model and no core waits for another
stage. At most ``window`` chunks are in flight; results come back in input order.

A replica that dies is replaced by the pool and its chunk run once more; a chunk
that kills a second replica is retried one item at a time, so only the culprit
(a file that crashes the image library, or exhausts memory) becomes an error row.
"""
from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future
from itertools import islice
from typing import TYPE_CHECKING

import torch

from steadyclip.batch import _prep
from steadyclip.batch.inputs import InputItem
from steadyclip.batch.writer import kill_point
from steadyclip.engine._rows import embed_decoded
from steadyclip.engine.outcome import ImageOutcome
from steadyclip.errors import ReplicaCrashError

if TYPE_CHECKING:
    from steadyclip.engine import Engine
    from steadyclip.engine._core import ForwardCore

_logger = logging.getLogger(__name__)

__all__ = ["ReplicaPipeline"]


class ReplicaPipeline:
    """Chunks of inputs to the engine's replicas, results in input order (drop-in for ``LocalPipeline``)."""

    def __init__(self, engine: Engine, *, max_file_bytes: int = _prep.DEFAULT_MAX_FILE_BYTES,
                 window: int | None = None) -> None:
        self.engine = engine
        self.max_file_bytes = max_file_bytes
        self.chunk = max(1, engine.micro_batch)
        self.workers = engine.replicas
        self.window = window or 2 * engine.replicas + 1  # chunks in flight: every replica has a next one
        self.model_s = 0.0  # not measured here: the model runs in the replicas
        self.wait_s = 0.0

    def run(self, items: Iterator[InputItem], part_size: int) -> Iterator[list[ImageOutcome]]:
        """Ordered results, one chunk (a micro-batch of inputs) at a time."""
        del part_size  # the runner groups rows into parts; any chunking gives the same rows
        window: deque[tuple[list[InputItem], Future[list[ImageOutcome]]]] = deque()
        chunks = iter(lambda: list(islice(items, self.chunk)), [])
        for chunk in chunks:
            window.append((chunk, self._submit(chunk)))
            if len(window) >= self.window:
                yield self._collect(*window.popleft())
        while window:
            yield self._collect(*window.popleft())

    def _submit(self, chunk: list[InputItem]) -> Future[list[ImageOutcome]]:
        fut: Future[list[ImageOutcome]] = self.engine.submit(prepare_and_embed, chunk, self.max_file_bytes)
        return fut

    def _collect(self, chunk: list[InputItem], fut: Future[list[ImageOutcome]]) -> list[ImageOutcome]:
        t = time.perf_counter()
        try:
            out = fut.result()
        except ReplicaCrashError:
            _logger.warning("a chunk of %d inputs killed two engine replicas; retrying them one by one", len(chunk))
            out = [self._isolate(item) for item in chunk]
        self.wait_s += time.perf_counter() - t
        kill_point("embedded")
        return out

    def _isolate(self, item: InputItem) -> ImageOutcome:
        try:
            rows: list[ImageOutcome] = self._submit([item]).result()
            return rows[0]
        except ReplicaCrashError:
            died = (f"reading {item.path} killed the engine replica twice; the file likely crashes the image "
                    "library or exhausts memory - inspect or remove it")
            return ImageOutcome.failed(item.index, item.path, ("DecoderCrashError", died))


def prepare_and_embed(core: ForwardCore, chunk: list[InputItem], max_file_bytes: int) -> list[ImageOutcome]:
    """In a replica: read, hash, decode and preprocess each input, then embed the good ones."""
    prepared = [_prep.prepare(item, core.loaded.preprocess, max_file_bytes) for item in chunk]
    return embed_decoded(core, [(o, None if pixels is None else torch.from_numpy(pixels)) for o, pixels in prepared])
