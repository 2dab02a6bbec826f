"""A text job's model stage on Ray Data: the same rows, the same bits as ``TextPipeline``, more machines.

``run_text_batch(..., backend="ray")`` (CLI: ``steadyclip batch --texts --engine ray``) sends the
job's embeddable texts through :class:`~steadyclip.batch.ray_backend.RayPipeline`'s session and
actor pool to :class:`_TextActor`\\ s, each a verified copy of the driver's engine (the same checks
as an image actor). A text's embedding is the bits ``Engine.embed_texts`` gives it alone, whatever
batch it rides in, so the rows equal the local job's. Error rows (blank, non-UTF-8, missing texts)
stay on the driver and are never sent; the ``truncated`` flag is computed on the driver too.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from steadyclip.batch.ray_backend import RayPipeline, verified_engine
from steadyclip.batch.text_inputs import TextItem
from steadyclip.engine.prompts import warn_truncation
from steadyclip.errors import BatchJobError

if TYPE_CHECKING:
    from steadyclip.engine import Engine

__all__ = ["RayTextPipeline"]

Collect = Callable[[list[TextItem], np.ndarray], list[Any]]  # (items, (K, D) for their K good ones) -> rows


class _TextActor:
    """A Ray actor: its own verified engine; embeds batches of texts."""

    def __init__(self, spec: dict[str, Any], expected: dict[str, Any]) -> None:
        self.engine, self.node = verified_engine(spec, expected)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        emb = self.engine.embed_texts([str(t) for t in batch["text"]])  # (N, D) float32
        return {"index": np.asarray(batch["index"], dtype=np.int64), "embedding": emb,
                "node": np.array([self.node] * len(emb), dtype=object)}


class RayTextPipeline(RayPipeline):
    """The model stage of a text job on Ray Data (drop-in for ``TextPipeline``).

    ``collect(items, emb)`` turns a run of items in input order, and the embeddings of the good
    ones among them, into rows (``text_job`` builds its ``TextOutcome`` rows so, for both backends).
    """

    def __init__(self, engine: Engine, collect: Collect, *, address: str | None = None,
                 actors: int | None = None, batch_size: int | None = None, verbose: bool = False) -> None:
        super().__init__(engine, dim=int(engine.embedding_dim), address=address, actors=actors,
                         batch_size=batch_size or 4 * engine.text_micro_batch, verbose=verbose)
        self.collect = collect

    def run(self, items: Iterator[TextItem], part_size: int) -> Iterator[list[Any]]:  # type: ignore[override]
        """Ordered rows: each Ray batch's texts, with the error rows before them that were never sent."""
        del part_size
        pending = list(items)
        good = [it for it in pending if _embeddable(it)]
        rows = [{"index": it.index, "text": str(it.text)} for it in good]
        at = 0  # next item of ``pending`` to hand out
        loaded = self.engine.loaded
        for batch in self.stream(rows, _TextActor, {}):
            last = int(batch["index"][-1])
            end = at
            while pending[end].index != last:
                end += 1
            chunk = pending[at:end + 1]
            sent = [it for it in chunk if _embeddable(it)]
            if [it.index for it in sent] != [int(i) for i in batch["index"]]:
                raise BatchJobError("internal error: Ray returned texts out of input order")
            warn_truncation(loaded.tokenizer, [str(it.text) for it in sent], loaded.info.context_length)
            at = end + 1
            yield self.collect(chunk, np.asarray(batch["embedding"], dtype=np.float32))
        if at < len(pending):  # error rows after the last text sent (or a job of error rows only)
            yield self.collect(pending[at:], np.zeros((0, self.dim), dtype=np.float32))


def _embeddable(it: TextItem) -> bool:
    return it.error is None and it.text is not None
