"""Process-wide settings that must precede torch's first use (imported before torch)."""
from __future__ import annotations

import os

_STATE: dict[str, str | None] = {}


def early_init() -> None:
    """Ask MKL for its conditional-numerical-reproducibility strict mode, unless the user chose.

    MKL reads ``MKL_CBWR`` once, at its first GEMM: set later it does nothing,
    so we record whether torch was already imported (too late to be sure).
    """
    if _STATE:
        return
    import sys

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
