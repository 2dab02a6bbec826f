"""What every batch job shares, whatever its inputs: progress, the summary, parts from an ordered stream.

An image job (``runner``) and a text job (``text_job``) differ in what they list, what their
model stage returns and how a row becomes Arrow; the rest - skipping finished parts, grouping
the ordered results into whole parts, checking the listing did not change while the job ran,
and assembling the file - is this module, so both are crash-safe and resumable the same way.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import pyarrow as pa

from steadyclip.batch.writer import RESTART_ADVICE, PartStore, StoreState
from steadyclip.errors import BatchJobError

if TYPE_CHECKING:
    from steadyclip.engine import Engine

__all__ = ["MODEL_KEYS", "BatchProgress", "BatchSummary", "check_listing", "execution", "write_parts"]

# The result-identity fields a JobSpec files under "model"; the rest go under "options".
MODEL_KEYS = ("model_id", "weights_sha256", "fingerprint")


@dataclass(frozen=True)
class BatchProgress:
    """Sent to the ``progress`` callback after each model step."""

    done: int  # rows finished, resumed ones included
    total: int
    errors: int  # error rows so far, resumed ones included
    resumed: int  # rows taken from an earlier, interrupted run


@dataclass(frozen=True)
class BatchSummary:
    """What a batch job did. ``items_per_s`` counts only rows computed by this run."""

    out: Path
    total: int
    ok: int
    errors: int
    resumed: int
    processed: int
    elapsed_s: float
    model_s: float  # time inside model forwards (local backend)
    wait_s: float  # time the model waited for decoded images (local backend)
    backend: str
    workers: int
    threads: int
    micro_batch: int  # rows per forward: images' micro_batch, or text_micro_batch for a text job
    already_complete: bool
    provenance: dict[str, Any] = field(default_factory=dict)
    execution: dict[str, Any] = field(default_factory=dict)  # layout: replicas, CPUs, Ray nodes (speed only)
    inputs: str = "images"  # "images" or "texts"

    @property
    def items_per_s(self) -> float:
        return self.processed / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["out"] = str(self.out)
        doc["items_per_s"] = self.items_per_s
        return doc


class _Item(Protocol):
    @property
    def index(self) -> int: ...


class _Row(Protocol):
    @property
    def index(self) -> int: ...
    @property
    def ok(self) -> bool: ...


class _Pipeline(Protocol):
    def run(self, items: Iterator[Any], part_size: int) -> Iterator[Sequence[Any]]: ...


R = TypeVar("R", bound=_Row)


def write_parts(store: PartStore, state: StoreState, pipeline: _Pipeline, listing: Iterable[_Item],
                to_table: Callable[[list[Any]], pa.Table], total: int,
                progress: Callable[[BatchProgress], None] | None) -> None:
    """Send the items of the missing parts through ``pipeline``; write each part as soon as it is whole."""
    part_size = store.part_size
    pending = (it for it in listing if it.index // part_size not in state.done_parts)
    counts = _Counts(done=state.done_rows, errors=state.done_errors)
    with contextlib.closing(pipeline.run(pending, part_size)) as stream:  # type: ignore[type-var]
        for k, rows in _parts(stream, part_size, counts, total, state.done_rows, progress):
            store.write_part(k, to_table(rows))


def check_listing(got: tuple[str, int], expected: tuple[str, int], description: str) -> None:
    """Refuse to assemble when the listing hashed while the job ran is not the one it was planned on."""
    if got != expected:
        raise BatchJobError(
            f"the input listing of {description!r} changed while the job ran; the finished parts "
            f"may not match the inputs any more. Run again with {RESTART_ADVICE}."
        )


def execution(engine: Engine, pipeline: Any) -> dict[str, Any]:
    """The job's layout (never written into the file: rows do not depend on it)."""
    doc: dict[str, Any] = engine.execution.to_dict()
    doc["pipeline"] = type(pipeline).__name__
    doc["workers"] = getattr(pipeline, "workers", None)
    nodes = getattr(pipeline, "nodes", None)
    if nodes is not None:
        doc["ray_nodes"] = sorted(nodes)
    return doc


@dataclass
class _Counts:
    done: int
    errors: int


def _parts(stream: Iterable[Sequence[R]], part_size: int, counts: _Counts, total: int, resumed: int,
           progress: Callable[[BatchProgress], None] | None) -> Iterator[tuple[int, list[R]]]:
    """Group the ordered result stream into whole parts."""
    current: list[R] = []
    for batch in stream:
        for r in batch:
            current.append(r)
            counts.done += 1
            counts.errors += not r.ok
            if (r.index + 1) % part_size == 0 or r.index + 1 == total:
                k = r.index // part_size
                if current[0].index != k * part_size:
                    raise BatchJobError(f"internal error: part {k} starts at row {current[0].index}")
                yield k, current
                current = []
        if progress is not None:
            progress(BatchProgress(counts.done, total, counts.errors, resumed))
    if current:
        raise BatchJobError(f"internal error: the input stream ended inside a part at row {current[-1].index}")
