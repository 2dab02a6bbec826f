"""How a run is laid out on the machine: the CPUs it may use, replicas, threads, decoders.

None of this decides a number. Every replica runs the same kernels at the same
pinned intra-op thread count on the same fixed micro-batch shape, so the layout
only decides speed. It is recorded in an :class:`ExecutionRecord`, kept apart
from the numerics provenance, so a file made on one core and one made on 64
cores carry the same numerics identity (and the same bytes).

CPUs this process may use = the affinity mask (``taskset``, container cpusets),
reduced by a cgroup CPU quota where one is set (``docker --cpus``, Kubernetes
limits): the quota, not the visible cores, is what the scheduler will give us.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from steadyclip.errors import InputError

_logger = logging.getLogger(__name__)

__all__ = ["ExecutionRecord", "auto_replicas", "cgroup_cpu_quota", "check_count", "usable_cpus"]

_CGROUP_ROOT = Path("/sys/fs/cgroup")


def cgroup_cpu_quota(root: Path = _CGROUP_ROOT) -> float | None:
    """CPUs allowed by a cgroup quota (v2 ``cpu.max`` or v1 ``cfs_quota_us``), ``None`` when unlimited."""
    candidates = [(root / "cpu.max", None), (root / "cpu" / "cpu.cfs_quota_us", root / "cpu" / "cpu.cfs_period_us"),
                  (root / "cpu,cpuacct" / "cpu.cfs_quota_us", root / "cpu,cpuacct" / "cpu.cfs_period_us")]
    for quota_file, period_file in candidates:
        try:
            text = quota_file.read_text().split()
            if period_file is None:  # v2: "max 100000" or "200000 100000"
                quota, period = text[0], text[1]
            else:
                quota, period = text[0], period_file.read_text().split()[0]
        except (OSError, IndexError):
            continue
        if quota in ("max", "-1"):
            return None
        try:
            q, p = float(quota), float(period)
        except ValueError:
            continue
        if q > 0 and p > 0:
            return q / p
    return None


def usable_cpus() -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup quota; at least 1."""
    try:
        visible = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        visible = os.cpu_count() or 1
    quota = cgroup_cpu_quota()
    if quota is not None:
        visible = min(visible, max(1, math.floor(quota + 0.5)))  # 1.5 CPUs -> 2 workers share them
    return max(1, visible)


def check_count(name: str, value: object, *, allow_auto: bool = True) -> int | None:
    """Validate a ``replicas=`` / ``threads=`` style argument: an int >= 1, or None / "auto"."""
    if allow_auto and (value is None or value == "auto"):
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        hint = ', or None/"auto" for the default' if allow_auto else ""
        raise InputError(f"{name} must be an int >= 1{hint}; got {value!r}")
    return value


def auto_replicas(threads: int, *, cpus: int | None = None, device: str = "cpu") -> int:
    """Default replica count: one per ``threads`` CPUs this process may use; one per CUDA device.

    Decoding runs inside the replicas (each decodes its own chunk, then runs it), so
    the model is never starved by a separate decoder stage and no core sits idle.
    """
    if device.startswith("cuda"):
        return 1  # one replica per device: the device, not the CPUs, bounds the work
    return max(1, (cpus or usable_cpus()) // max(1, threads))


@dataclass(frozen=True)
class ExecutionRecord:
    """How a result was computed on this machine (speed only; never part of a result's identity)."""

    replicas: int  # engine processes running forwards (1 = in this process)
    threads: int  # intra-op threads per replica
    threads_requested: int | None  # what the caller asked for, when it differs from ``threads``
    threads_verdict: str  # ThreadCheck.verdict: thread-invariant/-dependent, not-applicable, not-checked
    cpus: int  # CPUs this process may use (affinity, cgroup quota)
    cpu_count: int  # CPUs the OS reports
    interop_threads: int
    start_method: str  # how replicas are started ("fork" from a single-threaded zygote)
    extra: dict[str, Any] = field(default_factory=dict)  # entry-point specifics (decoders, Ray actors, ...)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        return f"replicas={self.replicas} threads/replica={self.threads} cpus={self.cpus}"
