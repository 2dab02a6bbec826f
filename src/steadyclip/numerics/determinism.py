"""The one place steadyclip touches torch's global numeric flags.

    >>> profile = get_profile("strict")                  # fp32, deterministic
    >>> with applied(profile, "cpu", threads=1) as flags, autocast(profile, "cpu"):
    ...     out = model(x)                                # flags -> provenance; no ambient autocast leaks in

Profiles (what ``strict`` and ``fast`` pin) are defined in :mod:`steadyclip.numerics.profiles`.
:func:`snapshot` and :func:`restore` save and put back the same flags for code that runs a
caller's model under the caller's own settings (``steadyclip doctor``).

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
:mod:`steadyclip.numerics.early`, and here with ``setdefault`` - a user's value wins):
    MKL_CBWR=AUTO,STRICT           MKL reads it at the process's first GEMM.
    CUBLAS_WORKSPACE_CONFIG=:4096:8  cuBLAS reads it when CUDA creates its handle;
                                   deterministic algorithms on CUDA need it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from steadyclip._util.forksafe import ForkSafeRLock
from steadyclip.errors import DeviceError
from steadyclip.numerics.early import early_init as _lead_early_init

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

from steadyclip.numerics.environment import FP32_LEAVES as _FP32_LEAVES
from steadyclip.numerics.environment import (
    current_flags,
    mkl_cbwr_effective,
    mkl_cbwr_state,
)
from steadyclip.numerics.environment import device_kind as _device
from steadyclip.numerics.environment import leaf_get as _leaf_get
from steadyclip.numerics.environment import leaf_set as _leaf_set
from steadyclip.numerics.environment import try_read as _try
from steadyclip.numerics.profiles import (
    PROFILES,
    Profile,
    check_supported,
    get_profile,
    resolve_profile,
)

__all__ = [
    "PROFILES",
    "FlagSnapshot",
    "Profile",
    "applied",
    "autocast",
    "current_flags",
    "early_init",
    "get_profile",
    "mkl_cbwr_effective",
    "mkl_cbwr_state",
    "resolve_profile",
    "restore",
    "restoring",
    "snapshot",
    "thread_count",
]

_logger = logging.getLogger(__name__)
_LOCK = ForkSafeRLock()  # an engine replica forked while a thread held it gets it unheld

@contextlib.contextmanager
def applied(profile: Profile, device: str | torch.device = "cpu", *, threads: int = 1) -> Iterator[dict[str, Any]]:
    """Apply ``profile``'s flags at ``threads`` intra-op threads for the block; yield the flags in
    effect; restore all on exit.

    Holds the module lock for the whole block (see the module docstring). Grad mode
    is turned off (thread-local); torch's CPU (and, on CUDA, that device's) RNG is
    seeded with ``profile.seed`` and restored after.

    Raises:
        DeviceError: device/precision unavailable; CUDA already initialised without a
            deterministic ``CUBLAS_WORKSPACE_CONFIG``; torch's flags frozen.
    """
    kind, index = _device(device)
    check_supported(profile, device)
    with _LOCK:
        if kind == "cuda" and profile.deterministic_algorithms:
            _ensure_cublas_config()  # before the snapshot below starts CUDA
        cuda = [torch.cuda.current_device() if index is None else index] if kind == "cuda" else []
        with restoring(cuda_devices=cuda), _pinned_kernels(profile, threads) as pinned:
            _apply(profile, cuda, threads)
            flags = current_flags(device)
            flags["pinned_kernels"] = pinned
            flags["profile"] = profile.to_dict()
            flags["guarantee"] = profile.guarantee
            flags["autocast_dtype"] = None  # never: fast casts its weights once (steadyclip.engine.precision)
            flags["compute_dtype"] = str(profile.compute_dtype or torch.float32).removeprefix("torch.")
            yield flags


@contextlib.contextmanager
def _pinned_kernels(profile: Profile, threads: int) -> Iterator[dict[str, Any] | None]:
    """portable: every GEMM on the pinned OpenBLAS kernels at ``threads``, attention as its math;
    yields the kernel facts (for the numerics key). Other profiles: nothing, ``None``."""
    if profile.name != "portable":
        yield None
        return
    from steadyclip.numerics import portable

    portable.check_ready()
    before = portable.set_blas_threads(threads)
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # the fused kernel is not portable; its parts are
    try:
        with portable.PortableOps():  # type: ignore[no-untyped-call]
            yield portable.blas_facts()
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        portable.set_blas_threads(before)


@contextlib.contextmanager
def thread_count(threads: int | None) -> Iterator[None]:
    """Another intra-op thread count for the block, every other flag untouched; restored on exit.

    For measuring the caller's own numerics at another thread count (``applied`` would also
    change the kernels). ``None`` or the current count changes nothing.
    """
    if threads is None or threads == torch.get_num_threads():
        yield
        return
    with _LOCK:
        old = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            yield
        finally:
            torch.set_num_threads(old)


@dataclasses.dataclass(frozen=True)
class FlagSnapshot:
    """Process-global torch numerics state as it stood: the flags ``applied`` sets, grad mode and RNG.

    Take one with :func:`snapshot`, put it back with :func:`restore`. ``settings`` is keyed
    by the flag names of :data:`steadyclip.numerics.identity.NUMERICS_FLAG_KEYS` (plus ``threads`` and
    ``grad_enabled``); ``fp32_precision`` holds the legacy TF32 switches and every leaf.
    """

    settings: dict[str, Any]
    cpu_rng: torch.Tensor
    cuda_rng: dict[int, torch.Tensor]  # by CUDA device index; empty when CUDA was not started or asked for


def snapshot(*, cuda_devices: Sequence[int] | None = None) -> FlagSnapshot:
    """Read every setting :func:`restore` puts back.

    Args:
        cuda_devices: the CUDA devices whose RNG to save. ``None``: every device if this
            process has started CUDA (asking never starts it), else none.
    """
    with _LOCK:
        if cuda_devices is None:
            cuda_devices = range(torch.cuda.device_count()) if _cuda_initialized() else ()
        return FlagSnapshot(settings={name: get() for name, get, _ in _SETTINGS},
                            cpu_rng=torch.get_rng_state(),
                            cuda_rng={i: torch.cuda.get_rng_state(i) for i in cuda_devices})


def restore(saved: FlagSnapshot) -> list[str]:
    """Put back every setting that differs from ``saved``, and the RNG states; returns what had changed.

    Raises:
        DeviceError: a setting could not be restored (each failure is logged; the rest are still restored).
    """
    changed: list[str] = []
    failures: list[BaseException] = []
    with _LOCK:
        for name, get, put in _SETTINGS:
            try:
                if get() != saved.settings[name]:
                    put(saved.settings[name])
                    changed.append(name)
            except Exception as e:  # noqa: BLE001 - keep restoring the rest; report after
                _logger.error("could not restore torch's %s: %s", name, e)
                failures.append(e)
        torch.set_rng_state(saved.cpu_rng)
        for index, state in saved.cuda_rng.items():
            torch.cuda.set_rng_state(state, index)
    if failures:
        raise DeviceError(f"{len(failures)} torch flag(s) could not be restored: {failures[0]}") from failures[0]
    return changed


@contextlib.contextmanager
def restoring(*, cuda_devices: Sequence[int] | None = None) -> Iterator[FlagSnapshot]:
    """:func:`snapshot` on entry, :func:`restore` on exit - also after an error, which then stays the one raised.

    Example:
        >>> with restoring():
        ...     run_the_callers_model()          # may change threads, TF32, grad mode, the RNG...
    """
    saved = snapshot(cuda_devices=cuda_devices)
    try:
        yield saved
    except BaseException:
        with contextlib.suppress(DeviceError):  # logged by restore
            restore(saved)
        raise
    restore(saved)


def autocast(profile: Profile, device: str | torch.device = "cpu") -> contextlib.AbstractContextManager[Any]:
    """Autocast explicitly *off* for every profile: a caller's ambient ``torch.autocast`` must not leak in.

    Reduced precision in ``fast`` comes from weights cast once (:mod:`steadyclip.engine.precision`), which
    is both faster than autocast on CPU and the same ops on every entry point.
    """
    kind, _ = _device(device)
    del profile  # every profile runs without autocast; kept in the signature for the call sites
    return torch.autocast(device_type=kind, enabled=False)


# ---- internals -------------------------------------------------------------------------
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


def _apply(profile: Profile, cuda_devices: Sequence[int], threads: int) -> None:
    """Set every flag of ``profile`` (:func:`applied` restores them from its snapshot)."""
    try:
        torch.set_num_threads(threads)
        _set_deterministic(profile.deterministic_algorithms, warn_only=False)
        torch.backends.cudnn.deterministic = profile.deterministic_algorithms
        torch.backends.cudnn.benchmark = profile.cudnn_benchmark
        torch._C._set_mkldnn_enabled(profile.onednn)
        _set_precision(profile.tf32)
    except RuntimeError as e:  # e.g. torch.backends.disable_global_flags() was called
        raise DeviceError(f"cannot set torch's numeric flags ({e}); steadyclip needs to control them") from e
    torch.set_grad_enabled(False)
    torch.default_generator.manual_seed(profile.seed)
    for index in cuda_devices:
        with torch.cuda.device(index):
            torch.cuda.manual_seed(profile.seed)


def _set_deterministic(mode: bool, *, warn_only: bool) -> None:
    if "torch._inductor.config" in sys.modules:
        torch.use_deterministic_algorithms(mode, warn_only=warn_only)
    else:
        # The public call imports torch._inductor (~5 s here) only to set a torch.compile
        # flag; steadyclip does not compile, so set the eager-mode switch alone.
        torch._C._set_deterministic_algorithms(mode, warn_only=warn_only)


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


def _deterministic_mode() -> tuple[bool, bool]:
    return torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()


def _set_cudnn(name: str) -> Callable[[Any], None]:
    return lambda value: setattr(torch.backends.cudnn, name, value)


# What snapshot() reads and restore() puts back: (name, read, write), in restore order.
_SETTINGS: tuple[tuple[str, Callable[[], Any], Callable[[Any], Any]], ...] = (
    ("threads", torch.get_num_threads, torch.set_num_threads),
    ("deterministic_algorithms", _deterministic_mode, lambda mode: _set_deterministic(mode[0], warn_only=mode[1])),
    ("cudnn_deterministic", lambda: bool(torch.backends.cudnn.deterministic), _set_cudnn("deterministic")),
    ("cudnn_benchmark", lambda: bool(torch.backends.cudnn.benchmark), _set_cudnn("benchmark")),
    ("onednn_enabled", torch._C._get_mkldnn_enabled, torch._C._set_mkldnn_enabled),
    ("fp32_precision", _save_precision, _restore_precision),
    ("grad_enabled", torch.is_grad_enabled, torch.set_grad_enabled),
)
