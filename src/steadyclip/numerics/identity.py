"""What decides a computation's numbers, read in one place and hashed one way.

Every cache key, self-check verdict, resume check, Ray actor check, lock and
provenance asks this module, so adding a numerics flag means editing one list.

Two kinds of facts about a run:
- **numerics**: weights, code versions, profile, the flags that change kernels
  (oneDNN, MKL CNR, matmul precision), the CPU capability. Two runs that agree on
  these compute the same bits; they are a result's identity.
- **execution**: replicas, threads per replica, interop threads, CPU counts,
  thread environment variables. Speed only (steadyclip pins what matters);
  recorded apart, in :class:`steadyclip.engine.layout.ExecutionRecord`.
"""
from __future__ import annotations

import functools
import platform
from collections.abc import Mapping
from importlib import metadata
from typing import Any

from steadyclip._util.digest import sha256_json

__all__ = ["EXECUTION_FLAG_KEYS", "NUMERICS_FLAG_KEYS", "RESULT_FIELDS", "execution_flags", "file_provenance",
           "numerics_flags",
           "numerics_key", "result_identity", "sha256_json", "software_stack"]

# Flags (from determinism.current_flags) that can change a forward's bits.
NUMERICS_FLAG_KEYS = ("onednn_enabled", "mkl_cbwr", "mkl_cbwr_effective", "float32_matmul_precision",
                      "fp32_precision", "deterministic_algorithms", "cudnn_deterministic", "cudnn_benchmark",
                      "cuda_matmul_allow_tf32", "cudnn_allow_tf32", "pinned_kernels")
# Flags that describe how the work was spread over the machine, never what it computed.
EXECUTION_FLAG_KEYS = ("threads", "interop_threads", "env")
# Provenance fields that decide a result's rows besides the numerics key: the weights as named and
# hashed, the profile, and the shapes the forwards ran at.
# Not the thread count: rows at T threads run only where proven equal to rows at 1.
RESULT_FIELDS = ("model_id", "weights_sha256", "fingerprint", "profile", "precision", "device",
                 "micro_batch", "batch_path", "text_micro_batch", "text_buckets")
_STACK_DISTS = ("open_clip_torch", "timm", "numpy", "safetensors", "pillow", "steadyclip")


@functools.lru_cache(maxsize=1)
def _stack() -> tuple[tuple[str, str], ...]:
    import torch

    out = [("python", platform.python_version()), ("torch", torch.__version__)]  # with its build tag (+cpu, +cu130)
    for dist in _STACK_DISTS:
        try:
            out.append((dist, metadata.version(dist)))
        except metadata.PackageNotFoundError:
            out.append((dist, "not installed"))
    return tuple(out)


def software_stack() -> dict[str, str]:
    """Versions of the libraries that shape a result (read once per process)."""
    return dict(_stack())


def numerics_flags(flags: dict[str, Any]) -> dict[str, Any]:
    """The part of a flags document that decides numbers (threads, env and layout removed)."""
    return {k: v for k, v in flags.items() if k not in EXECUTION_FLAG_KEYS}


def execution_flags(flags: dict[str, Any]) -> dict[str, Any]:
    """The layout part of a flags document (threads in effect, interop threads, thread env vars)."""
    return {k: flags[k] for k in EXECUTION_FLAG_KEYS if k in flags}


def numerics_key(*, fingerprint: str, config_hash: str | None, profile: dict[str, Any], device: str,
                 flags: dict[str, Any]) -> str:
    """The key of everything a forward's bits depend on besides its input.

    Used by the text cache, the self-check verdicts and every "same computation?"
    check. ``flags`` is a document from :func:`steadyclip.numerics.determinism.current_flags`.
    """
    basis = {
        "fingerprint": fingerprint, "config": config_hash, "profile": profile, "device": device,
        "versions": software_stack(),
        "flags": {k: flags.get(k) for k in NUMERICS_FLAG_KEYS},
        "cpu": (flags.get("build") or {}).get("cpu_capability"),
    }
    return sha256_json(basis)


# Facts of the machine a run happened on, in a provenance's flags["build"].
MACHINE_BUILD_KEYS = ("cpu_vendor", "cpu_model", "cpu_count")


def file_provenance(provenance: dict[str, Any]) -> dict[str, Any]:
    """The provenance a result file records. portable: without the machine's facts (CPU, cores, the
    thread count that ran), so the same job on any CPU writes a byte-identical file; others: as is."""
    if provenance.get("profile") != "portable":
        return provenance
    flags = dict(provenance.get("flags") or {})
    flags["build"] = {k: v for k, v in (flags.get("build") or {}).items() if k not in MACHINE_BUILD_KEYS}
    return {**provenance, "threads": None, "flags": flags}


def result_identity(provenance: Mapping[str, Any], numerics: str) -> dict[str, Any]:
    """What two runs must agree on to write the same rows: :data:`RESULT_FIELDS` and the numerics key.

    A resumed batch job must match its first run on all of it, a Ray actor its driver.
    ``numerics`` is the engine's :func:`numerics_key` (``Engine.numerics_basis()``).
    """
    return {**{k: provenance[k] for k in RESULT_FIELDS}, "numerics": numerics}
