"""Reading the numerics environment: which flags, env vars and torch build a forward's bits depend on.

Read-only: nothing here sets a flag (that is :mod:`steadyclip.numerics.determinism`'s job, through
one context manager). :func:`current_flags` is what goes into provenance.
"""
from __future__ import annotations

import ctypes
import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from steadyclip.errors import DeviceError
from steadyclip.numerics.early import early_state

__all__ = ["FP32_LEAVES", "current_flags", "device_kind", "leaf_get", "leaf_set", "mkl_cbwr_effective",
           "mkl_cbwr_state", "try_read"]

# torch's per-(backend, op) fp32 precision leaves, parents first: setting a parent
# rewrites its children, so restoring in this order reproduces every leaf exactly.
FP32_LEAVES = (("generic", "all"), ("cuda", "all"), ("cuda", "matmul"), ("cuda", "conv"), ("cuda", "rnn"),
               ("mkldnn", "all"), ("mkldnn", "matmul"), ("mkldnn", "conv"), ("mkldnn", "rnn"))


def device_kind(device: str | torch.device) -> tuple[str, int | None]:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as e:
        raise DeviceError(f"unrecognised device {device!r}: {e}; use 'cpu', 'cuda' or 'cuda:N'") from e
    if dev.type not in ("cpu", "cuda"):
        raise DeviceError(f"device {device!r} is not supported by steadyclip; use 'cpu', 'cuda' or 'cuda:N'")
    return dev.type, dev.index




def mkl_cbwr_state() -> str | None:
    """``MKL_CBWR`` as it stood when steadyclip was imported (before, we hope, the first GEMM)."""
    return early_state().get("value")


def mkl_cbwr_effective() -> str | None:
    """The CNR mode MKL itself reports, e.g. ``"AUTO,STRICT"``; ``None`` if MKL can't be asked.

    Best effort through MKL's service symbol in torch's CPU library. ``"OFF"`` while
    ``MKL_CBWR`` asks for a mode means it was set after the first GEMM: too late.
    """
    get = _mkl_cbwr_getter()
    if get is None:
        return None
    code = int(get(-1))  # MKL_CBWR_ALL
    branch = _CBWR_BRANCHES.get(code & 0xFFFF, hex(code & 0xFFFF))
    return f"{branch},STRICT" if code & 0x10000 else branch


def current_flags(device: str | torch.device = "cpu") -> dict[str, Any]:
    """The numeric flags in effect now, JSON-friendly (see :func:`applied`)."""
    kind, index = device_kind(device)
    env = {k: os.environ.get(k) for k in ("MKL_CBWR", "CUBLAS_WORKSPACE_CONFIG", "OMP_NUM_THREADS",
                                          "MKL_NUM_THREADS")}
    early = early_state()
    requested, effective = mkl_cbwr_state(), mkl_cbwr_effective()
    flags: dict[str, Any] = {
        "device": kind if index is None else f"{kind}:{index}",
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "deterministic_warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
        "cudnn_deterministic": bool(torch.backends.cudnn.deterministic),
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
        "onednn_enabled": bool(torch._C._get_mkldnn_enabled()),
        "float32_matmul_precision": try_read(torch.get_float32_matmul_precision),
        "cuda_matmul_allow_tf32": try_read(lambda: bool(torch.backends.cuda.matmul.allow_tf32)),
        "cudnn_allow_tf32": try_read(lambda: bool(torch.backends.cudnn.allow_tf32)),
        "fp32_precision": {f"{backend}.{op}": leaf_get((backend, op)) for backend, op in FP32_LEAVES},
        "grad_enabled": torch.is_grad_enabled(),
        "mkl_cbwr": requested,
        "mkl_cbwr_source": "user" if early.get("user_value") is not None else "steadyclip",
        "mkl_cbwr_set_after_torch_import": early.get("torch_imported_before") == "yes",
        "mkl_cbwr_effective": effective,
        "mkl_cbwr_status": ("unknown" if effective is None or requested is None
                            else "too late" if "STRICT" in requested.upper() and "STRICT" not in effective
                            else "in effect"),
        "env": env,
        "build": _build_info(),
        "pinned_kernels": None,  # the portable profile's GEMM kernels, set inside determinism.applied
    }
    if kind == "cuda":
        flags["cuda_matmul_fp16_reduced_reduction"] = bool(
            torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction)
        flags["cuda_matmul_bf16_reduced_reduction"] = bool(
            torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction)
        flags["cuda_device_name"] = torch.cuda.get_device_name(index or 0) if torch.cuda.is_available() else None
    return flags


# The (backend, op) accessors are what torch.backends.*.fp32_precision call; the public
# attributes don't reach every leaf (cudnn.conv and cuda.all alias in odd ways).
_GET_LEAF = getattr(torch._C, "_get_fp32_precision_getter", None)
_SET_LEAF = getattr(torch._C, "_set_fp32_precision_setter", None)


def leaf_get(leaf: tuple[str, str]) -> str | None:
    if _GET_LEAF is None:
        return None  # torch < 2.9: only the legacy switches exist
    return str(_GET_LEAF(*leaf))


def leaf_set(leaf: tuple[str, str], value: str) -> None:
    if _SET_LEAF is not None:
        _SET_LEAF(*leaf, value)


def try_read(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except RuntimeError:
        return None


_CBWR_BRANCHES = {0: "OFF", 1: "OFF", 2: "AUTO", 3: "COMPATIBLE", 4: "SSE2", 6: "SSSE3", 7: "SSE4_1", 8: "SSE4_2",
                  9: "AVX", 10: "AVX2", 11: "AVX512_MIC", 12: "AVX512", 13: "AVX512_MIC_E1", 14: "AVX512_E1"}


@functools.lru_cache(maxsize=1)
def _mkl_cbwr_getter() -> Callable[[int], int] | None:
    if not torch.backends.mkl.is_available():  # type: ignore[no-untyped-call]
        return None
    lib_dir = Path(torch.__file__).parent / "lib"
    for name in ("libtorch_cpu.so", "libtorch_cpu.dylib", "torch_cpu.dll"):
        if not (lib_dir / name).exists():
            continue
        try:
            lib = ctypes.CDLL(str(lib_dir / name))
        except OSError:
            return None
        for symbol in ("mkl_cbwr_get", "mkl_serv_cbwr_get", "MKL_CBWR_GET"):
            fn = getattr(lib, symbol, None)
            if fn is not None:
                fn.restype, fn.argtypes = ctypes.c_int, [ctypes.c_int]
                return fn  # type: ignore[no-any-return]
    return None


def _cpu_identity() -> dict[str, str | None]:
    """The CPU's vendor and model: with the capability, they decide strict's bits (MKL picks kernels per CPU).

    From :func:`steadyclip.numerics.cpuid.cpu_facts` (the CPUID instruction, so an emulated CPU reports
    itself; ``/proc/cpuinfo`` where the instruction cannot run)."""
    from steadyclip.numerics.cpuid import cpu_facts

    facts = cpu_facts()
    return {"cpu_vendor": facts.get("cpu_vendor"), "cpu_model": facts.get("cpu_model")}


@functools.lru_cache(maxsize=1)
def _build_info() -> dict[str, Any]:
    """Static facts about the torch build (cached: ``torch.__config__.show()`` is slow-ish)."""
    config = torch.__config__.show()
    mkl = next((ln.strip(" -") for ln in config.splitlines() if "Math Kernel Library" in ln), None)
    onednn = next((ln.strip(" -") for ln in config.splitlines() if "MKL-DNN" in ln or "oneDNN" in ln), None)
    cudnn = bool(torch.backends.cudnn.is_available())  # type: ignore[no-untyped-call]
    parallel = next((ln.split(":", 1)[1].strip() for ln in torch.__config__.parallel_info().splitlines()
                     if "parallel backend" in ln), None)
    return {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cudnn else None,  # type: ignore[no-untyped-call]
        "mkl_available": bool(torch.backends.mkl.is_available()),  # type: ignore[no-untyped-call]
        "mkldnn_available": bool(torch.backends.mkldnn.is_available()),  # type: ignore[no-untyped-call]
        "mkl": mkl,
        "onednn": onednn,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        **_cpu_identity(),
        "parallel_backend": parallel,
        "cpu_count": os.cpu_count(),
    }
