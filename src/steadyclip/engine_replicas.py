"""The engine's replica set: how many replicas, at how many threads, and the tasks they run.

The pool (:mod:`steadyclip.replicas`) is started at the first call bigger than one
micro-batch, after the engine has built its provenance (self-checks, flags), so
every replica is a copy of an engine that has already decided its batch paths and
thread count: replicas never re-check, never disagree.
"""
from __future__ import annotations

import logging
import threading
import weakref
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from steadyclip import identity, selfcheck
from steadyclip._futures import joined_rows
from steadyclip.errors import InputError
from steadyclip.layout import ExecutionRecord, auto_replicas, usable_cpus

if TYPE_CHECKING:
    from steadyclip.engine import Engine
    from steadyclip.replicas import ReplicaPool

_logger = logging.getLogger(__name__)

__all__ = ["ReplicaSet"]


class ReplicaSet:
    """Replica count, proven thread count and the lazily started pool of one engine."""

    def __init__(self, engine: Engine, *, requested_threads: int | None, requested_replicas: int | None) -> None:
        self._ref = weakref.ref(engine)  # the pool must not keep its engine alive
        self.requested_threads = requested_threads
        self.requested_replicas = requested_replicas
        self._threads: int | None = None
        self._verdict = "pinned"
        self._pool: ReplicaPool | None = None
        self._finalizer: weakref.finalize[Any, Any] | None = None
        self._lock = threading.Lock()

    @property
    def _engine(self) -> Engine:
        engine = self._ref()
        if engine is None:
            raise ReferenceError("the engine of this replica set is gone")
        return engine

    # ---- layout ---------------------------------------------------------------------------
    @property
    def threads(self) -> int:
        if self._threads is None:
            self._threads = self._resolve_threads()
        return self._threads

    @property
    def count(self) -> int:
        if self.requested_replicas is not None:
            return self.requested_replicas
        return auto_replicas(self.threads, device=self._engine.device.type)

    def wanted(self) -> bool:
        """Is there more than one replica to spread work over?"""
        return self.count > 1

    def _resolve_threads(self) -> int:
        """The requested thread count where rows at it equal rows at 1 thread; else 1 (recorded)."""
        t = self.requested_threads
        if t is None or t == 1:
            self._verdict = "pinned"
            return 1
        eng = self._engine
        key = identity.sha256_json(["threads", eng.numerics_basis(), t, eng.micro_batch, eng.text_micro_batch])
        store = selfcheck.SelfCheckStore()
        verdict = store.get(key)
        if verdict not in ("verified-invariant", "rows-differ"):
            same = all(
                selfcheck.rows_equal_threads(eng.tower(kind)[0], eng.probe_inputs(kind, eng.tower(kind)[1]),
                                             eng.profile, eng.device.type, t)
                for kind in ("image", "text"))
            verdict = "verified-invariant" if same else "rows-differ"
            store.put(key, verdict)
        if verdict == "verified-invariant":
            self._verdict = "verified-invariant"
            return t
        self._verdict = f"refused: rows at {t} threads differ from rows at 1 thread for this model here"
        _logger.warning("threads=%d refused: this model's rows at %d threads differ from its rows at 1 thread "
                        "on this machine; running 1 thread per replica (more replicas instead)", t, t)
        return 1

    def record(self) -> ExecutionRecord:
        return ExecutionRecord(
            replicas=self.count, threads=self.threads,
            threads_requested=self.requested_threads if self.requested_threads != self.threads else None,
            threads_verdict=self._verdict, cpus=usable_cpus(), cpu_count=_cpu_count(),
            interop_threads=torch.get_num_interop_threads(), start_method="fork (zygote)",
            extra={"replica_restarts": self._pool.restarts if self._pool is not None else 0},
        )

    # ---- the pool ------------------------------------------------------------------------
    def pool(self) -> ReplicaPool:
        """The running pool (started on first use, after the engine's self-checks)."""
        if self._pool is None:
            _ = self._engine.provenance, self.threads  # decide paths, flags and threads before forking
        with self._lock:
            if self._pool is None:
                if self._engine.device.type != "cpu":
                    raise InputError(
                        f"replicas={self.count} on {self._engine.device}: a device runs one replica (forked "
                        "processes cannot share a CUDA context); use replicas=1, and one process per GPU")
                from steadyclip.replicas import ReplicaPool

                pool = ReplicaPool(self._engine, self.count, init=_init_replica)
                self._finalizer = weakref.finalize(self, pool.close)
                self._pool = pool
                _logger.info("started %d engine replicas at %d thread(s) each", self.count, self.threads)
            return self._pool

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()

    def submit(self, fn: Any, *args: Any) -> Future[Any]:
        """Run ``fn(engine_copy, *args)`` in a replica (which checks its copy's state before each forward).

        This process's model is not checked here: replicas are copies forked when the pool
        started, so a change to it later cannot reach their rows.
        """
        return self.pool().submit(fn, *args)

    def forward_async(self, kind: str, x: torch.Tensor) -> Future[np.ndarray]:
        """Raw rows (N, D) of ``x`` as one future: one micro-batch per task, in input order."""
        _, size = self._engine.tower(kind)
        arr = x.cpu().numpy()
        return joined_rows([self.submit(_forward_task, kind, arr[s : s + size]) for s in range(0, arr.shape[0], size)])


def _cpu_count() -> int:
    import os

    return os.cpu_count() or 1


def _init_replica(engine: Engine) -> None:
    """In a new replica: fresh locks (a parent thread may have held them at fork), pinned threads."""
    engine._lock = threading.RLock()
    torch.set_num_threads(engine.threads)


def _forward_task(engine: Engine, kind: str, rows: np.ndarray) -> np.ndarray:
    return engine.forward_local(kind, torch.from_numpy(rows))

