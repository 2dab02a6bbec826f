"""Crash-safe output: atomic part files, a job journal, and atomic assembly of the final file.

Layout while a job runs, for ``out="results.parquet"``::

    results.parquet.parts/
        job.json                 what this job is (inputs hash, model, labels, options)
        lock                     held while a process works on the job
        part-00000000.parquet    rows [0, part_size)
        part-00000001.parquet    rows [part_size, 2*part_size) ...

Part k always holds exactly the inputs with ``index // part_size == k``, so a
part file either exists complete (written to a temporary name, fsynced, renamed)
or not at all, and a resumed job recomputes only missing parts. At the end the
parts are copied, in order, into a temporary file next to the output, which is
fsynced and renamed over ``out``; then the parts folder is removed. A kill at
any moment leaves either the old state or the new one.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from steadyclip._util.atomic import atomic_path, write_atomic
from steadyclip.batch.table import METADATA_KEY
from steadyclip.errors import BatchJobError, InputError

_logger = logging.getLogger(__name__)

__all__ = ["RESTART_ADVICE", "JobSpec", "PartStore", "StoreState", "kill_point"]

FORMAT_VERSION = 1
# How a caller discards an earlier job, in both vocabularies (the library's argument, the CLI's flag).
RESTART_ADVICE = "restart=True (--restart)"
_NEW_OUT = "a new output path (out=, --out)"
_KILL_ENV = "STEADYCLIP_BATCH_TEST_KILL_AT"
_kill_counts: dict[str, int] = {}


def kill_point(name: str) -> None:
    """Test hook: SIGKILL this process at the n-th pass of ``name`` if ``STEADYCLIP_BATCH_TEST_KILL_AT=name:n``.

    Points: ``embedded`` (after a model forward), ``part-tmp`` (a part is written
    but not yet renamed), ``part-written``, ``assemble-tmp``, ``assembled``.
    """
    spec = os.environ.get(_KILL_ENV)
    if not spec:
        return
    point, _, nth = spec.partition(":")
    if point != name:
        return
    _kill_counts[name] = _kill_counts.get(name, 0) + 1
    if _kill_counts[name] >= int(nth or 1):
        _logger.warning("test hook %s=%s: killing this process", _KILL_ENV, spec)
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass(frozen=True)
class JobSpec:
    """What makes two runs "the same job": any difference and a resume is refused."""

    inputs_sha256: str
    n_inputs: int
    model: dict[str, Any]
    labels_sha256: str | None
    templates_sha256: str | None
    options: dict[str, Any]
    # SHA-256 of the class (label) embeddings the job classifies against. They come from the
    # text tower or the text cache; if the stack's numerics drifted since the first run, a
    # resume would mix two sets of probabilities, so this is part of the job's identity.
    class_embeddings_sha256: str | None = None
    format_version: int = FORMAT_VERSION
    description: dict[str, Any] = field(default_factory=dict, compare=False)  # informational only

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> JobSpec:
        return cls(**{k: doc[k] for k in cls.__dataclass_fields__ if k in doc})

    def differences(self, other: JobSpec) -> list[str]:
        """Human-readable list of what differs from ``other`` (the earlier job)."""
        out = []
        if (self.inputs_sha256, self.n_inputs) != (other.inputs_sha256, other.n_inputs):
            out.append(f"the input list changed ({other.n_inputs} -> {self.n_inputs} items, "
                       f"hash {other.inputs_sha256[:12]} -> {self.inputs_sha256[:12]})")
        for key in sorted(set(self.model) | set(other.model)):
            if self.model.get(key) != other.model.get(key):
                out.append(f"model {key} changed ({other.model.get(key)!r} -> {self.model.get(key)!r})")
        if self.labels_sha256 != other.labels_sha256:
            out.append("the labels changed")
        if self.templates_sha256 != other.templates_sha256:
            out.append("the prompt templates changed")
        elif self.labels_sha256 == other.labels_sha256 and \
                self.class_embeddings_sha256 != other.class_embeddings_sha256:
            out.append("the label embeddings computed now differ bitwise from the first run's (the software "
                       "stack, numerics settings or text cache changed since)")
        for key in sorted(set(self.options) | set(other.options)):
            if self.options.get(key) != other.options.get(key):
                why = " (the software versions, numerics flags or CPU differ)" if key == "numerics" else ""
                out.append(f"option {key} changed ({other.options.get(key)!r} -> {self.options.get(key)!r}){why}")
        if self.format_version != other.format_version:
            out.append(f"job format changed ({other.format_version} -> {self.format_version})")
        return out


@dataclass(frozen=True)
class StoreState:
    """Where a job stands when it is opened."""

    complete: bool  # the output already holds this exact job
    done_parts: frozenset[int]
    done_rows: int
    done_errors: int


class PartStore:
    """The parts folder and final file of one job."""

    def __init__(self, out: str | os.PathLike[str], job: JobSpec, *, part_size: int) -> None:
        if part_size < 1:
            raise InputError(f"part_size must be >= 1, got {part_size}")
        self.out = Path(out)
        self.job = job
        self.part_size = part_size
        self.parts_dir = self.out.with_name(self.out.name + ".parts")
        self.n_parts = -(-job.n_inputs // part_size)

    # ---- opening / resuming ---------------------------------------------------------------
    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the job's lock (one process per job); released even on SIGKILL (flock)."""
        from filelock import FileLock, Timeout

        if self.out.is_dir():
            raise BatchJobError(f"the output {self.out} is a folder; give a file name such as "
                                f"{self.out / 'results.parquet'}")
        with _io_errors(f"create {self.parts_dir}"):
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self.parts_dir.mkdir(exist_ok=True)
        lock = FileLock(str(self.parts_dir / "lock"))
        try:
            lock.acquire(timeout=0)
        except Timeout as e:
            raise BatchJobError(
                f"another process is already running the job writing {self.out}; wait for it, or stop it first"
            ) from e
        try:
            yield
        finally:
            lock.release()

    def open(self, *, restart: bool) -> StoreState:
        """Start, resume or recognise a finished job (call inside :meth:`locked`).

        Raises:
            BatchJobError: the parts or the output belong to a different job (and not ``restart``).
        """
        journal = self.parts_dir / "job.json"
        self.cleanup_stale_outputs()
        if restart:
            self._discard()
        if journal.is_file():
            earlier = self._read_journal(journal)
            diffs = self.job.differences(earlier)
            if diffs:
                raise BatchJobError(
                    f"cannot resume the unfinished job in {self.parts_dir}: " + "; ".join(diffs) +
                    f". Use {_NEW_OUT} for a different job, or {RESTART_ADVICE} to discard the finished parts."
                )
            if self._output_matches():  # killed between the final rename and the clean-up
                shutil.rmtree(self.parts_dir, ignore_errors=True)
                return StoreState(True, frozenset(), self.job.n_inputs, 0)
            return self._scan_parts()
        if self.out.exists():
            shutil.rmtree(self.parts_dir, ignore_errors=True)  # holds only our lock
            if self._output_matches():
                return StoreState(True, frozenset(), self.job.n_inputs, 0)
            raise BatchJobError(
                f"{self.out} already exists and holds a different job (or is not a steadyclip result); "
                f"use {_NEW_OUT}, or {RESTART_ADVICE} to replace it"
            )
        write_atomic(journal, json.dumps(self.job.to_dict(), indent=2, sort_keys=True).encode())
        return StoreState(False, frozenset(), 0, 0)

    def _discard(self) -> None:
        for p in self.parts_dir.iterdir():
            if p.name != "lock":
                p.unlink()
        if self.out.exists():
            _logger.warning("restart: removing %s", self.out)
            self.out.unlink()

    def _read_journal(self, journal: Path) -> JobSpec:
        try:
            return JobSpec.from_dict(json.loads(journal.read_text()))
        except (OSError, ValueError, TypeError) as e:
            raise BatchJobError(f"the job journal {journal} is unreadable ({e}); start over with {RESTART_ADVICE}") \
                from e

    def _output_matches(self) -> bool:
        try:
            meta = pq.read_schema(self.out).metadata or {}
            doc = json.loads(meta[METADATA_KEY])
            return not self.job.differences(JobSpec.from_dict(doc["job"]))
        except Exception:  # noqa: BLE001 - missing, not Parquet, not ours: all mean "not this job"
            return False

    def _scan_parts(self) -> StoreState:
        for stale in self.parts_dir.glob("*.tmp-*"):
            stale.unlink()
        done: set[int] = set()
        rows = errors = 0
        for p in sorted(self.parts_dir.glob("part-*.parquet")):
            k = int(p.stem.split("-")[1])
            try:
                status = pq.read_table(p, columns=["status"]).column("status")
            except Exception as e:  # noqa: BLE001 - a part damaged outside our control: recompute it
                _logger.warning("part %s is unreadable (%s); it will be recomputed", p.name, e)
                p.unlink()
                continue
            if k >= self.n_parts or len(status) != self._part_len(k):
                _logger.warning("part %s has %d rows, expected %d; it will be recomputed", p.name, len(status),
                                self._part_len(k) if k < self.n_parts else 0)
                p.unlink()
                continue
            done.add(k)
            rows += len(status)
            errors += int(pc.sum(pc.equal(status, "error")).as_py() or 0)
        _logger.info("resuming %s: %d of %d parts already done", self.out, len(done), self.n_parts)
        return StoreState(False, frozenset(done), rows, errors)

    def _part_len(self, k: int) -> int:
        return min(self.part_size, self.job.n_inputs - k * self.part_size)

    def part_path(self, k: int) -> Path:
        return self.parts_dir / f"part-{k:08d}.parquet"

    # ---- writing ---------------------------------------------------------------------------
    def write_part(self, k: int, table: pa.Table) -> None:
        """Write part ``k`` atomically (temp file, fsync, rename, fsync the folder)."""
        expected = list(range(k * self.part_size, k * self.part_size + self._part_len(k)))
        if table.column("index").to_pylist() != expected:
            raise BatchJobError(f"internal error: part {k} does not hold rows {expected[0]}..{expected[-1]}")
        final = self.part_path(k)
        with _io_errors(f"write {final}"), atomic_path(final) as tmp:
            pq.write_table(table, tmp)
            kill_point("part-tmp")
        kill_point("part-written")

    def assemble(self, schema: pa.Schema, metadata: dict[str, Any]) -> tuple[int, int]:
        """Copy all parts, in order, into the output atomically; remove the parts. Returns (ok, errors).

        Raises:
            BatchJobError: a part is missing or does not match the job's schema.
        """
        ok = errors = 0
        for k in range(self.n_parts):
            p = self.part_path(k)
            if not p.is_file():
                raise BatchJobError(f"part {p} is missing; re-run the same command to compute it")
            cols = pq.read_table(p, columns=["index", "status"])
            start = k * self.part_size
            if cols.num_rows != self._part_len(k) or cols.column("index")[0].as_py() != start:
                raise BatchJobError(f"part {p} does not hold rows {start}.. of this job; start over with "
                                    f"{RESTART_ADVICE}")
            n_err = int(pc.sum(pc.equal(cols.column("status"), "error")).as_py() or 0)
            errors += n_err
            ok += cols.num_rows - n_err
        doc = {**metadata, "job": self.job.to_dict(), "rows": ok + errors, "ok": ok, "errors": errors}
        full = schema.with_metadata({METADATA_KEY: json.dumps(doc, sort_keys=True).encode()})
        with _io_errors(f"write {self.out}"), atomic_path(self.out) as tmp:
            with pq.ParquetWriter(tmp, full) as writer:
                for k in range(self.n_parts):
                    table = pq.read_table(self.part_path(k))
                    if not table.schema.equals(schema):
                        raise BatchJobError(
                            f"part {self.part_path(k)} has a different schema than this job; start over "
                            f"with {RESTART_ADVICE}"
                        )
                    writer.write_table(table.replace_schema_metadata(full.metadata),
                                       row_group_size=self.part_size)
            kill_point("assemble-tmp")
        kill_point("assembled")
        shutil.rmtree(self.parts_dir, ignore_errors=True)
        return ok, errors

    def cleanup_stale_outputs(self) -> None:
        """Remove temporary final files left by a killed assembly."""
        for stale in self.out.parent.glob(f".{self.out.name}.tmp-*"):
            stale.unlink()


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The steadyclip metadata (provenance, labels, job, counts) of a batch output file."""
    meta = pq.read_schema(path).metadata or {}
    if METADATA_KEY not in meta:
        raise BatchJobError(f"{path} has no steadyclip metadata; it was not written by `steadyclip batch`")
    result: dict[str, Any] = json.loads(meta[METADATA_KEY])
    return result


@contextlib.contextmanager
def _io_errors(what: str) -> Iterator[None]:
    """Turn an OSError (disk full, permissions) into advice: the job resumes once it is fixed."""
    try:
        yield
    except OSError as e:
        raise BatchJobError(
            f"cannot {what}: {e.strerror or e}; fix that (disk space, permissions) and run the same "
            "command again - finished parts are kept and the job resumes"
        ) from e
