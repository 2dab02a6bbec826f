"""Determinism profiles, and the one place steadyclip touches torch's global numeric flags.

    >>> profile = get_profile("strict")                  # fp32, deterministic, 1 thread
    >>> with applied(profile, "cpu") as flags, autocast(profile, "cpu"):
    ...     out = model(x)                                # flags -> provenance; no ambient autocast leaks in

Profiles:
    strict  fp32, no autocast, TF32 off everywhere, deterministic algorithms, cuDNN
            deterministic and no autotuning, fixed thread count, seeded RNG.
            Same input + same batch shape + same machine/stack -> bitwise same output.
    fast    reduced-precision *weights*, cast once (:mod:`steadyclip.precision`): bf16 on
            a CPU with native bf16 (AMX / AVX512-BF16; refused elsewhere), bf16 on CUDA
            where supported, else fp16; TF32 allowed on CUDA; never autocast (on CPU it
            is slower than fp32: the casts dominate). Still deterministic algorithms,
            cuDNN deterministic and fixed threads, so bitwise the same across processes
            at a fixed shape and thread count - but not equal to strict; the drift from
            strict is measured, not assumed (:mod:`steadyclip.drift`).

Process-global state, and the lock. Torch's flags (deterministic algorithms, cuDNN,
TF32/fp32 precision, the default thread count) belong to the whole process.
:func:`applied` therefore holds one module-level ``RLock`` for its whole duration:
nested use in one thread works (inner restores the outer's values), and threads
are serialized. We chose serialization over letting several threads share a
profile because the thread count is also per-OS-thread OpenMP state and its
save/restore cannot be made right with overlapping holders; a server with one
engine funnels forwards through one worker (queue + micro-batches) anyway, so the
lock is uncontended there, and parallelism comes from intra-op threads. Don't
enter in one thread and leave in another (e.g. across ``await``).

MKL_CBWR measured here (AMD EPYC, MKL 2024.2): it reaches MKL (``mkl_cbwr_effective``)
but changed no result: a row at batch 1-3 differs from batch >= 4 with or without it
(another GEMM kernel), rows at batch >= 4 agree either way. Fixed batch shapes, not
MKL_CBWR, are what make rows batch-independent; the engine pads to them.

Environment that must precede first use (set by ``steadyclip/__init__`` via
:mod:`steadyclip._early`, and here with ``setdefault`` - a user's value wins):
    MKL_CBWR=AUTO,STRICT           MKL reads it at the process's first GEMM.
    CUBLAS_WORKSPACE_CONFIG=:4096:8  cuBLAS reads it when CUDA creates its handle;
                                   deterministic algorithms on CUDA need it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import random
import sys
from collections.abc import Callable, Iterator
from typing import Any

from steadyclip._early import early_init as _lead_early_init
from steadyclip._forksafe import ForkSafeRLock
from steadyclip.errors import DeviceError, InputError

CUBLAS_WORKSPACE = ":4096:8"
_CUBLAS_DETERMINISTIC = (":4096:8", ":16:8")


def early_init() -> None:
    """Set ``MKL_CBWR`` and ``CUBLAS_WORKSPACE_CONFIG`` unless the user did; idempotent.

    Must run before the process's first GEMM / first CUDA use; ``import steadyclip`` does it.
    """
    _lead_early_init()
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)


early_init()

import torch

from steadyclip.numerics_env import FP32_LEAVES as _FP32_LEAVES
from steadyclip.numerics_env import current_flags, mkl_cbwr_effective, mkl_cbwr_state
from steadyclip.numerics_env import device_kind as _device
from steadyclip.numerics_env import leaf_get as _leaf_get
from steadyclip.numerics_env import leaf_set as _leaf_set
from steadyclip.numerics_env import try_read as _try

__all__ = [
    "PROFILES",
    "Profile",
    "applied",
    "autocast",
    "current_flags",
    "early_init",
    "get_profile",
    "mkl_cbwr_effective",
    "mkl_cbwr_state",
    "seed_everything",
]

_logger = logging.getLogger(__name__)
_LOCK = ForkSafeRLock()  # an engine replica forked while a thread held it gets it unheld

PROFILES = ("strict", "fast")
_PRECISIONS = ("fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_GUARANTEE = {
    "strict": "bitwise identical for the same input and batch shape on this machine and software stack",
    "fast": "bitwise identical across processes at a fixed batch shape and thread count on this machine; "
            "reduced-precision weights, not bitwise equal to strict (drift measured)",
}


@dataclasses.dataclass(frozen=True)
class Profile:
    """How numerics are pinned for a run. Build with :func:`get_profile`."""

    name: str  # "strict" | "fast"
    precision: str  # "fp32" | "bf16" | "fp16": the dtype of the weights and inputs a forward runs in
    threads: int  # intra-op threads during forwards (the row for an input can depend on it)
    tf32: bool  # TF32 tensor cores for fp32 matmul/conv on CUDA (never on CPU oneDNN)
    deterministic_algorithms: bool  # torch.use_deterministic_algorithms
    cudnn_benchmark: bool = False  # autotuning picks kernels by timing: run-to-run drift
    seed: int = 0  # torch CPU/CUDA generators are seeded inside applied() and restored after
    # oneDNN convolutions give thread-count-dependent rows (RN50: 1 vs 2 threads differ ~1e-8);
    # torch's native convolutions (GEMM-based) do not, at about the same speed on one thread.
    onednn: bool = True

    def __post_init__(self) -> None:
        if self.name not in PROFILES:
            raise InputError(f"unknown profile {self.name!r}; choose one of {', '.join(PROFILES)}")
        if self.precision not in _PRECISIONS:
            raise InputError(f"unknown precision {self.precision!r}; choose one of {', '.join(_PRECISIONS)}")
        if isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 1:
            raise InputError(f"threads must be an int >= 1, got {self.threads!r}")
        if not self.deterministic_algorithms or self.cudnn_benchmark:
            raise InputError(f"every steadyclip profile is deterministic run to run (deterministic algorithms on, "
                             f"cuDNN benchmark off); got {self}")
        if self.name == "strict" and (self.precision != "fp32" or self.tf32):
            raise InputError(f"a strict profile is fp32 without TF32, got {self}; "
                             "use get_profile('fast', ...) for reduced precision")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise InputError(f"seed must be an int, got {self.seed!r}")

    @property
    def compute_dtype(self) -> torch.dtype | None:
        """The reduced dtype weights are cast to, or ``None`` for fp32."""
        return _DTYPES.get(self.precision)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly fields, for provenance."""
        return dataclasses.asdict(self)


def get_profile(
    name: str = "strict",
    *,
    threads: int | None = None,
    device: str | torch.device = "cpu",
    precision: str | None = None,
    seed: int = 0,
    onednn: bool | None = None,
) -> Profile:
    """The named profile for ``device``, checked against what the device supports.

    Args:
        name: ``"strict"`` or ``"fast"``.
        threads: intra-op threads; default 1 (on 2-vCPU machines 2 threads measured up to 3x slower).
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        precision: fast only: ``"bf16"`` (CPU default; CUDA default where supported), ``"fp16"`` (CUDA
            default without bf16) or ``"fp32"``.
        seed: seeds torch's generators inside :func:`applied`.
        onednn: use oneDNN convolutions. Default: off in strict (native convolutions give the same
            bits at any thread count), on in fast. Turning it on in strict is faster for conv nets
            (RN50, ConvNeXt) but makes rows depend on the (pinned, recorded) thread count.

    Raises:
        InputError: unknown name or precision, bad thread count, a precision for strict.
        DeviceError: the device, or the precision on that device, is not available.

    Example:
        >>> get_profile("fast", device="cpu").precision
        'bf16'
    """
    if name not in PROFILES:
        raise InputError(f"unknown profile {name!r}; choose one of {', '.join(PROFILES)}")
    kind, _ = _device(device)
    if name == "strict":
        if precision not in (None, "fp32"):
            raise InputError(f"the strict profile is fp32 only, got precision={precision!r}; use profile 'fast'")
        chosen = "fp32"
    else:
        chosen = precision or ("bf16" if kind != "cuda" or _cuda_bf16() else "fp16")
    profile = Profile(name=name, precision=chosen, threads=1 if threads is None else threads,
                      tf32=name == "fast", deterministic_algorithms=True, cudnn_benchmark=False, seed=seed,
                      onednn=(name != "strict") if onednn is None else bool(onednn))
    _check_supported(profile, device)
    if profile.threads > (os.cpu_count() or 1):
        _logger.warning("threads=%d exceeds the %s CPUs here; expect slower forwards", profile.threads, os.cpu_count())
    return profile


def identity_profile(profile: str | Profile, device: str, onednn: bool | None) -> Profile:
    """The profile that names a result's numbers: rows are those at one intra-op thread."""
    if isinstance(profile, Profile):
        if onednn is not None and onednn != profile.onednn:
            raise InputError(f"onednn={onednn} contradicts the given profile's onednn={profile.onednn}")
        return dataclasses.replace(profile, threads=1)
    if not isinstance(profile, str):
        raise InputError(f"profile must be 'strict', 'fast' or a Profile, got {profile!r}")
    return get_profile(profile, threads=1, device=device, onednn=onednn)


@contextlib.contextmanager
def applied(profile: Profile, device: str | torch.device = "cpu") -> Iterator[dict[str, Any]]:
    """Apply ``profile``'s flags for the block; yield the flags in effect; restore all on exit.

    Holds the module lock for the whole block (see the module docstring). Grad mode
    is turned off (thread-local); torch's CPU (and, on CUDA, that device's) RNG is
    seeded with ``profile.seed`` and restored after.

    Raises:
        DeviceError: device/precision unavailable; CUDA already initialised without a
            deterministic ``CUBLAS_WORKSPACE_CONFIG``; torch's flags frozen.
    """
    kind, index = _device(device)
    _check_supported(profile, device)
    with _LOCK:
        undo: list[Callable[[], None]] = []
        try:
            _apply(profile, kind, index, undo)
            flags = current_flags(device)
            flags["profile"] = profile.to_dict()
            flags["guarantee"] = _GUARANTEE[profile.name]
            flags["autocast_dtype"] = None  # never: fast casts its weights once (steadyclip.precision)
            flags["compute_dtype"] = str(profile.compute_dtype or torch.float32).removeprefix("torch.")
            yield flags
        except BaseException:
            _undo(undo, raise_errors=False)  # the block's own error is the one to see
            raise
        _undo(undo, raise_errors=True)


def autocast(profile: Profile, device: str | torch.device = "cpu") -> contextlib.AbstractContextManager[Any]:
    """Autocast explicitly *off* for every profile: a caller's ambient ``torch.autocast`` must not leak in.

    Reduced precision in ``fast`` comes from weights cast once (:mod:`steadyclip.precision`), which
    is both faster than autocast on CPU and the same ops on every entry point.
    """
    kind, _ = _device(device)
    del profile  # every profile runs without autocast; kept in the signature for the call sites
    return torch.autocast(device_type=kind, enabled=False)


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy's global RNG and torch (all devices)."""
    import numpy as np

    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


# ---- internals -------------------------------------------------------------------------
def _check_supported(profile: Profile, device: str | torch.device) -> None:
    kind, index = _device(device)
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {str(device)!r} requested but CUDA is not available (torch "
                              f"{torch.__version__}, built for CUDA {torch.version.cuda}); use device='cpu'")
        if index is not None and index >= torch.cuda.device_count():
            raise DeviceError(f"device {str(device)!r} requested but only {torch.cuda.device_count()} CUDA "
                              "device(s) exist; pick one of them")
        if profile.precision == "bf16" and not torch.cuda.is_bf16_supported():
            raise DeviceError("bf16 requested on a CUDA device without bf16 support; use precision='fp16'")


def _cuda_bf16() -> bool:
    return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())


def _ensure_cublas_config() -> None:
    value = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    if value in _CUBLAS_DETERMINISTIC:
        return
    if value is None and not _cuda_initialized():
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_WORKSPACE
        return
    raise DeviceError(
        f"deterministic CUDA needs CUBLAS_WORKSPACE_CONFIG={CUBLAS_WORKSPACE} (or :16:8) before CUDA starts, "
        f"but it is {value!r}{' and CUDA is already initialised' if _cuda_initialized() else ''}; "
        f"run `export CUBLAS_WORKSPACE_CONFIG={CUBLAS_WORKSPACE}` (or import steadyclip before using CUDA)"
    )


def _cuda_initialized() -> bool:
    return bool(torch.cuda.is_initialized())  # type: ignore[no-untyped-call]


def _apply(profile: Profile, kind: str, index: int | None, undo: list[Callable[[], None]]) -> None:
    """Set every flag, pushing its restore onto ``undo`` first-set-last-undone."""
    if kind == "cuda" and profile.deterministic_algorithms:
        _ensure_cublas_config()
    try:
        _swap(undo, torch.get_num_threads, torch.set_num_threads, profile.threads)
        det = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
        undo.append(lambda: _set_deterministic(det[0], warn_only=det[1]))
        _set_deterministic(profile.deterministic_algorithms, warn_only=False)
        cudnn = torch.backends.cudnn
        _swap(undo, lambda: cudnn.deterministic, lambda v: setattr(cudnn, "deterministic", v),
              profile.deterministic_algorithms)
        _swap(undo, lambda: cudnn.benchmark, lambda v: setattr(cudnn, "benchmark", v), profile.cudnn_benchmark)
        _swap(undo, torch._C._get_mkldnn_enabled, torch._C._set_mkldnn_enabled, profile.onednn)
        saved = _save_precision()
        undo.append(lambda: _restore_precision(saved))
        _set_precision(profile.tf32)
    except RuntimeError as e:  # e.g. torch.backends.disable_global_flags() was called
        raise DeviceError(f"cannot set torch's numeric flags ({e}); steadyclip needs to control them") from e
    _swap(undo, torch.is_grad_enabled, torch.set_grad_enabled, False)
    cpu_rng = torch.get_rng_state()
    undo.append(lambda: torch.set_rng_state(cpu_rng))
    torch.default_generator.manual_seed(profile.seed)
    if kind == "cuda":
        cuda_index = torch.cuda.current_device() if index is None else index
        cuda_rng = torch.cuda.get_rng_state(cuda_index)
        undo.append(lambda: torch.cuda.set_rng_state(cuda_rng, cuda_index))
        with torch.cuda.device(cuda_index):
            torch.cuda.manual_seed(profile.seed)


def _set_deterministic(mode: bool, *, warn_only: bool) -> None:
    if "torch._inductor.config" in sys.modules:
        torch.use_deterministic_algorithms(mode, warn_only=warn_only)
    else:
        # The public call imports torch._inductor (~5 s here) only to set a torch.compile
        # flag; steadyclip does not compile, so set the eager-mode switch alone.
        torch._C._set_deterministic_algorithms(mode, warn_only=warn_only)


def _swap(undo: list[Callable[[], None]], get: Callable[[], Any], put: Callable[[Any], Any], value: Any) -> None:
    old = get()
    undo.append(lambda: put(old))
    put(value)


def _undo(undo: list[Callable[[], None]], *, raise_errors: bool) -> None:
    failures: list[BaseException] = []
    for restore in reversed(undo):
        try:
            restore()
        except Exception as e:  # noqa: BLE001 - keep restoring the rest; report after
            _logger.error("could not restore a torch flag: %s", e)
            failures.append(e)
    if failures and raise_errors:
        raise DeviceError(f"{len(failures)} torch flag(s) could not be restored: {failures[0]}") from failures[0]


# TF32 state has two layers in torch >= 2.9: legacy switches (float32_matmul_precision,
# cudnn.allow_tf32) and per-backend fp32_precision leaves; torch raises when reading a
# legacy switch that disagrees with its leaves. So: set legacy then leaves (consistent
# inside), restore legacy then leaves (exactly what was there). A legacy value that was
# unreadable (the user mixed the APIs) is restored to one that is unreadable again.
def _save_precision() -> tuple[str | None, bool | None, tuple[str | None, ...]]:
    return (_try(torch.get_float32_matmul_precision), _try(lambda: bool(torch.backends.cudnn.allow_tf32)),
            tuple(_leaf_get(leaf) for leaf in _FP32_LEAVES))


def _set_precision(tf32: bool) -> None:
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    torch.backends.cudnn.allow_tf32 = tf32
    for leaf in _FP32_LEAVES:
        # TF32 only ever on CUDA; oneDNN on CPU stays IEEE fp32 (fast casts its weights to bf16 instead).
        _leaf_set(leaf, "tf32" if tf32 and leaf[0] == "cuda" else "ieee")


def _restore_precision(saved: tuple[str | None, bool | None, tuple[str | None, ...]]) -> None:
    matmul, cudnn_tf32, leaves = saved
    by_leaf = dict(zip(_FP32_LEAVES, leaves))
    if matmul is None:  # unreadable = the hidden legacy value disagreed with the leaves; keep it so
        matmul = "highest" if by_leaf.get(("cuda", "matmul")) == "tf32" else "high"
    if cudnn_tf32 is None:
        cudnn_tf32 = by_leaf.get(("cuda", "conv")) != "tf32"
    torch.set_float32_matmul_precision(matmul)
    torch.backends.cudnn.allow_tf32 = cudnn_tf32
    for leaf, value in zip(_FP32_LEAVES, leaves):
        if value is not None:
            _leaf_set(leaf, value)


