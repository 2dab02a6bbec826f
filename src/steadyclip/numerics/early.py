"""Process-wide settings that must precede torch's first use (imported before torch)."""
from __future__ import annotations

import os
import sys

_STATE: dict[str, str | None] = {}

# The portable profile's half that only works from a process's start (numerics/portable.py has
# the rest): torch dispatches its baseline kernels, numpy's OpenBLAS loads its SandyBridge
# (AVX, no FMA) kernel table on every CPU, MKL (which portable never asks for a GEMM) its
# CPU-independent branch.
PORTABLE_CORETYPE = "SandyBridge"
PORTABLE_ENV = {"ATEN_CPU_CAPABILITY": "default", "OPENBLAS_CORETYPE": PORTABLE_CORETYPE,
                "MKL_CBWR": "COMPATIBLE"}
# Speed, not bits (a user's own value wins): torch's OpenMP threads sleep when idle instead of
# spinning, so OpenBLAS's GEMM threads get the cores (measured: ViT-B-32 at 2 threads, 2.06 s ->
# 1.18 s a forward of 8 images; no change at 1 thread).
PORTABLE_SPEED_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}


def early_init() -> None:
    """Ask MKL for its conditional-numerical-reproducibility strict mode, unless the user chose.

    MKL reads ``MKL_CBWR`` once, at its first GEMM: set later it does nothing,
    so we record whether torch was already imported (too late to be sure).
    """
    if _STATE:
        return
    user = os.environ.get("MKL_CBWR")
    _STATE["user_value"] = user
    _STATE["torch_imported_before"] = "yes" if "torch" in sys.modules else "no"
    if user is None:
        os.environ["MKL_CBWR"] = "AUTO,STRICT"
    # Deterministic cuBLAS needs its workspace fixed before CUDA initialises.
    _STATE["cublas_user_value"] = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    _STATE["value"] = os.environ["MKL_CBWR"]


def early_state() -> dict[str, str | None]:
    """What ``early_init`` found and set (for provenance and ``doctor``)."""
    return dict(_STATE)


def portable_env_problems(env: dict[str, str] | None = None) -> list[str]:
    """What in ``env`` (default: this process's) keeps the portable profile from running, in words."""
    env = dict(os.environ) if env is None else env
    return [f"{key}={env.get(key)!r} (needs {value!r})" for key, value in PORTABLE_ENV.items()
            if env.get(key, "").lower() != value.lower()]


def portable_environ(base: dict[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: this process's environment) with the portable profile's variables set
    (and :data:`PORTABLE_SPEED_ENV` where ``base`` does not choose)."""
    return {**PORTABLE_SPEED_ENV, **(dict(os.environ) if base is None else base), **PORTABLE_ENV}


def portable_overlay() -> dict[str, str]:
    """The variables a process started for portable work gets on top of this one's environment."""
    return {k: v for k, v in portable_environ().items() if os.environ.get(k) != v}
