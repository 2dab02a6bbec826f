"""The engine's replica set: how many replicas, and the tasks they run. Internal.

The pool (:mod:`steadyclip.engine._pool`) is started at the first call bigger than one
micro-batch, after the forward core has decided its batch paths, flags and thread count, so
every replica is a copy of a core that has already run its self-checks: replicas never
re-check, never disagree. Tasks run ``fn(core_copy, *args)``.
"""
from __future__ import annotations

import logging
import os
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from steadyclip._util.futures import joined_rows, mapped
from steadyclip.engine._core import ForwardCore
from steadyclip.engine.layout import ExecutionRecord, auto_replicas, usable_cpus
from steadyclip.errors import InputError

if TYPE_CHECKING:
    from steadyclip.engine._pool import ReplicaPool

_logger = logging.getLogger(__name__)

__all__ = ["ReplicaSet"]


class ReplicaSet:
    """Replica count and the lazily started pool of one forward core."""

    def __init__(self, core: ForwardCore, *, prepare: Callable[[], object]) -> None:
        self.core = core
        self._prepare = prepare  # builds the engine's provenance (self-checks, drift) before the fork
        self._pool: ReplicaPool | None = None
        self._finalizer: weakref.finalize[Any, Any] | None = None
        self._lock = threading.Lock()

    @property
    def count(self) -> int:
        if self.core.settings.replicas is not None:
            return self.core.settings.replicas
        return auto_replicas(self.core.threads, device=self.core.device.type)

    def wanted(self) -> bool:
        """Is there more than one replica to spread work over (and no self-check running here)?"""
        return self.count > 1 and not self.core.checks_running

    def use_for(self, rows: int, kind: str = "image") -> bool:
        """Should ``rows`` inputs go to the replicas (more than one micro-batch, replicas wanted)?"""
        return rows > self.core.size(kind) and self.wanted()

    def record(self) -> ExecutionRecord:
        """How work is laid out: replicas, the threads that really ran, and the thread self-check's verdict."""
        wanted = self.core.settings.requested_threads
        return ExecutionRecord(
            replicas=self.count, threads=self.core.threads,
            threads_requested=wanted if wanted != self.core.threads else None,
            threads_verdict=self.core.thread_verdict.verdict, cpus=usable_cpus(), cpu_count=os.cpu_count() or 1,
            interop_threads=torch.get_num_interop_threads(), start_method="fork (zygote)",
            extra={"replica_restarts": self._pool.restarts if self._pool is not None else 0},
        )

    # ---- the pool ------------------------------------------------------------------------
    def pool(self) -> ReplicaPool:
        """The running pool (started on first use, after the core's self-checks)."""
        if self._pool is None:
            self._prepare()
            _ = self.core.threads, self.core.batch_path("image"), self.core.batch_path("text")
        with self._lock:
            if self._pool is None:
                if self.core.device.type != "cpu":
                    raise InputError(
                        f"replicas={self.count} on {self.core.device}: a device runs one replica (forked "
                        "processes cannot share a CUDA context); use replicas=1, and one process per GPU")
                from steadyclip.engine._pool import ReplicaPool

                pool = ReplicaPool(self.core, self.count, init=ForwardCore.after_fork)
                self._finalizer = weakref.finalize(self, pool.close)
                self._pool = pool
                _logger.info("started %d engine replicas at %d thread(s) each", self.count, self.core.threads)
            return self._pool

    def pids(self) -> list[int]:
        """Process ids of the running replicas; empty before the pool starts (or after ``close``)."""
        pool = self._pool
        return pool.pids() if pool is not None else []

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        """Run ``fn(core_copy, *args)`` in a replica (which checks its copy's state before each forward).

        This process's model is not checked here: replicas are copies forked when the pool
        started, so a change to it later cannot reach their rows.
        """
        return self.pool().submit(fn, *args)

    def forward_async(self, kind: str, x: torch.Tensor, spread: int | None = None) -> Future[np.ndarray]:
        """Raw rows (N, D) of ``x`` as one future, in input order: one forward per task, each of one
        shape (texts are grouped by their sequence-length bucket first; :meth:`ForwardCore.shape_tasks`),
        each group over at least ``spread`` tasks where it has the rows (default: every replica)."""
        split = self.core.shape_tasks(kind, x, spread=self.count if spread is None else spread)
        order = np.concatenate([rows for rows, _ in split]) if split else np.zeros(0, dtype=np.int64)
        arr = x.cpu().numpy()
        tasks = [self.submit(_forward_task, kind, arr[rows], size) for rows, size in split]
        inverse = np.argsort(order, kind="stable")  # grouped order -> input order
        return mapped(joined_rows(tasks), lambda rows: rows[inverse] if len(rows) else rows)


def _forward_task(core: ForwardCore, kind: str, rows: np.ndarray, size: int) -> np.ndarray:
    return core.forward_local(kind, torch.from_numpy(rows), size)
