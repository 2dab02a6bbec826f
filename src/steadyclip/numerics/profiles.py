"""Determinism profiles: how a run's numerics are pinned, checked against what the device supports.

    >>> get_profile("strict")                # fp32, deterministic
    >>> get_profile("fast", device="cpu")    # bf16 weights on a CPU with native bf16

Profiles:
    strict  fp32, no autocast, TF32 off everywhere, deterministic algorithms, cuDNN
            deterministic and no autotuning, fixed thread count, seeded RNG.
            Same input + same batch shape + same machine/stack -> bitwise same output.
    fast    reduced-precision *weights*, cast once (:mod:`steadyclip.engine.precision`): bf16 on
            a CPU with native bf16 (AMX / AVX512-BF16; refused elsewhere), bf16 on CUDA
            where supported, else fp16; TF32 allowed on CUDA; never autocast (on CPU it
            is slower than fp32: the casts dominate). Still deterministic algorithms,
            cuDNN deterministic and fixed threads, so bitwise the same across processes
            at a fixed shape and thread count - but not equal to strict; the drift from
            strict is measured, not assumed (:mod:`steadyclip.numerics.drift`).
    portable
            fp32 on the CPU with every kernel pinned to one CPU-independent choice
            (:mod:`steadyclip.numerics.portable`): strict's promise on any x86-64 CPU with AVX,
            given the same software stack. Not bitwise equal to strict (other GEMM kernels).

A profile only describes; :func:`steadyclip.numerics.determinism.applied` sets its flags.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch

from steadyclip.errors import DeviceError, InputError
from steadyclip.numerics.environment import device_kind as _device

__all__ = ["PROFILES", "Profile", "check_supported", "get_profile", "resolve_profile"]

_logger = logging.getLogger(__name__)

PROFILES = ("strict", "fast", "portable")
_PRECISIONS = ("fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_GUARANTEES = {
    "strict": "bitwise identical for the same input and batch shape on this machine and software stack",
    "portable": "bitwise identical for the same input and batch shape on every x86-64 CPU with AVX "
                "(Intel, AMD, Hygon) with this software stack",
    "fast": "bitwise identical across processes at a fixed batch shape and thread count on this machine; "
            "reduced-precision weights, not bitwise equal to strict (drift measured)",
}


@dataclasses.dataclass(frozen=True)
class Profile:
    """How numerics are pinned for a run. Build with :func:`get_profile`."""

    name: str  # "strict" | "fast" | "portable"
    precision: str  # "fp32" | "bf16" | "fp16": the dtype of the weights and inputs a forward runs in
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
        if not self.deterministic_algorithms or self.cudnn_benchmark:
            raise InputError(f"every steadyclip profile is deterministic run to run (deterministic algorithms on, "
                             f"cuDNN benchmark off); got {self}")
        if self.name in ("strict", "portable") and (self.precision != "fp32" or self.tf32):
            raise InputError(f"a {self.name} profile is fp32 without TF32, got {self}; "
                             "use get_profile('fast', ...) for reduced precision")
        if self.name == "portable" and self.onednn:
            raise InputError("the portable profile never runs oneDNN (its kernels are chosen per CPU); "
                             "leave onednn unset")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise InputError(f"seed must be an int, got {self.seed!r}")

    @property
    def guarantee(self) -> str:
        """What this profile promises about repeated results, in words (goes into provenance)."""
        return _GUARANTEES[self.name]

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
    device: str | torch.device = "cpu",
    precision: str | None = None,
    seed: int = 0,
    onednn: bool | None = None,
) -> Profile:
    """The named profile for ``device``, checked against what the device supports.

    Args:
        name: ``"strict"`` or ``"fast"``.
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
    if name in ("strict", "portable"):
        if precision not in (None, "fp32"):
            raise InputError(f"the {name} profile is fp32 only, got precision={precision!r}; use profile 'fast'")
        chosen = "fp32"
    else:
        chosen = precision or ("bf16" if kind != "cuda" or _cuda_bf16() else "fp16")
    profile = Profile(name=name, precision=chosen,
                      tf32=name == "fast", deterministic_algorithms=True, cudnn_benchmark=False, seed=seed,
                      onednn=(name == "fast") if onednn is None else bool(onednn))
    check_supported(profile, device)
    return profile


def resolve_profile(profile: str | Profile, device: str, onednn: bool | None) -> Profile:
    """A profile name or object -> the checked :class:`Profile` for ``device`` (``onednn`` must agree)."""
    if isinstance(profile, Profile):
        if onednn is not None and onednn != profile.onednn:
            raise InputError(f"onednn={onednn} contradicts the given profile's onednn={profile.onednn}")
        check_supported(profile, device)
        return profile
    if not isinstance(profile, str):
        raise InputError(f"profile must be 'strict', 'fast' or a Profile, got {profile!r}")
    return get_profile(profile, device=device, onednn=onednn)


def check_supported(profile: Profile, device: str | torch.device) -> None:
    """Raise DeviceError when ``device`` cannot run ``profile`` (no CUDA, no such device, no bf16)."""
    kind, index = _device(device)
    if profile.name == "portable" and kind != "cpu":
        raise DeviceError(f"the portable profile computes on the CPU only (GPU kernels are not the same on "
                          f"every card); got device {str(device)!r}: use device='cpu', or profile 'strict' on {kind}")
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
