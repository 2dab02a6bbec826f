"""Reduced precision for the ``fast`` profile: does this CPU do bf16 natively, and the cast weights.

    >>> support = cpu_bf16_support()            # reads /proc/cpuinfo flags, never assumes them
    >>> cast = prepare(loaded, profile, "cpu")  # raises DeviceError on a CPU without native bf16
    >>> cast.model                              # a bf16 copy; ``loaded.model`` stays fp32

Why a cast copy and not autocast: on CPU, bf16 autocast spends its time casting
(measured on a Xeon with AMX, ViT-B-32, micro-batch 8, 1 thread: 0.19x of fp32);
weights cast once and bf16 inputs ran at 2.15x. Why a *copy* and not an in-place
cast: the fp32 model stays what was loaded and hashed, so its tamper check
(``LoadedModel.check_buffers``), a strict engine on the same ``LoadedModel``, the
drift measurement and ``doctor`` keep working; the copy costs half the fp32 weight
memory again (ViT-B-32: ~300 MB) and has its own tamper check.

Why refuse without native bf16: torch then emulates bf16 with fp32 arithmetic plus
conversions, slower than plain fp32; a ``fast`` that is slower than ``strict`` and
less exact is worse on both counts. Users who know better (detection missed a
feature, or they want bf16 numbers on purpose, e.g. tests) opt in explicitly with
``STEADYCLIP_ASSUME_NATIVE_BF16=1`` or ``Engine(..., allow_emulated_bf16=True)``;
the opt-in is recorded in the provenance of every result.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import logging
import os
import platform
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from steadyclip.errors import DeviceError, IntegrityError
from steadyclip.model import integrity

if TYPE_CHECKING:
    from steadyclip.model.loading import LoadedModel
    from steadyclip.numerics.determinism import Profile

_logger = logging.getLogger(__name__)

__all__ = ["ASSUME_ENV", "Bf16Support", "CastModel", "cpu_bf16_support", "prepare", "read_cpu_flags"]

ASSUME_ENV = "STEADYCLIP_ASSUME_NATIVE_BF16"
CPUINFO = Path("/proc/cpuinfo")
# x86: AMX tiles with bf16, or AVX-512 bf16 dot products. aarch64: FEAT_BF16 ("bf16" in Features).
NATIVE_BF16_FLAGS: dict[str, tuple[str, ...]] = {"x86_64": ("amx_bf16", "avx512_bf16"), "aarch64": ("bf16",)}
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclasses.dataclass(frozen=True)
class Bf16Support:
    """What this CPU offers for bf16 and where that was read."""

    native: bool  # the CPU has bf16 arithmetic (AMX-BF16, AVX512-BF16 or Arm BF16)
    features: tuple[str, ...]  # the native-bf16 flags found, e.g. ("amx_bf16", "avx512_bf16")
    machine: str  # platform.machine()
    source: str  # where the flags came from, or why they could not be read
    cpu: str  # the CPU model name, for humans

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def read_cpu_flags(path: Path = CPUINFO) -> tuple[set[str] | None, str]:
    """The CPU's feature flags (``flags`` on x86, ``Features`` on Arm) and its model name; ``None`` if unreadable."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None, "unknown"
    flags: set[str] | None = None
    name = "unknown"
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("flags", "features") and flags is None:
            flags = set(value.split())
        elif key in ("model name", "cpu part") and name == "unknown":
            name = value.strip()
    return flags, name


@functools.lru_cache(maxsize=1)
def cpu_bf16_support() -> Bf16Support:
    """Detect native bf16 from the CPU's own flags (cached for the process)."""
    machine = platform.machine().lower()
    wanted = NATIVE_BF16_FLAGS.get(machine, ())
    flags, name = read_cpu_flags()
    if flags is None:
        return Bf16Support(False, (), machine, f"{CPUINFO} not readable: cannot tell, so no native bf16 assumed",
                           name)
    found = tuple(f for f in wanted if f in flags)
    return Bf16Support(bool(found), found, machine, str(CPUINFO), name)


def _assumed_by_env() -> bool:
    value = os.environ.get(ASSUME_ENV, "").strip().lower()
    if value in ("", "0", "false", "no"):
        return False
    if value in ("1", "true", "yes"):
        return True
    raise DeviceError(f"{ASSUME_ENV}={os.environ[ASSUME_ENV]!r} is not understood; set it to 1 (or unset it)")


def _refusal(support: Bf16Support) -> DeviceError:
    wanted = ", ".join(NATIVE_BF16_FLAGS.get(support.machine, ("(none known for this machine)",)))
    return DeviceError(
        f"profile 'fast' runs bf16 weights, but this CPU ({support.cpu}, {support.machine}) has no native bf16 "
        f"(looked for {wanted} in {support.source}; found none). torch would emulate bf16, which is slower than "
        "fp32 here and less exact. Use profile 'strict' (fp32: exact and at least as fast on this CPU). To run "
        f"bf16 anyway (e.g. to measure its drift), set {ASSUME_ENV}=1 or pass Engine(..., allow_emulated_bf16=True); "
        "the choice is recorded in every result's provenance."
    )


class CastModel:
    """A reduced-precision copy of a loaded model, built once, checked before every forward."""

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype, record: dict[str, Any]) -> None:
        self.model = model
        self.dtype = dtype
        self.record = record  # goes into provenance (``Provenance.reduced_precision``)
        self._fp = integrity.buffers_fingerprint(model)

    def check(self) -> None:
        """The copy's own tamper check (the fp32 original has ``LoadedModel.check_buffers``).

        Raises:
            IntegrityError: the cast copy changed since it was made.
        """
        if integrity.buffers_fingerprint(self.model) != self._fp:
            raise IntegrityError("the engine's reduced-precision copy of the model changed in memory since it was "
                                 "cast; build a new Engine")

    def cast_input(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels (floating) to the copy's dtype; token ids (integers) unchanged."""
        return x.to(self.dtype) if x.is_floating_point() else x


def cast_copy(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A copy of ``model`` whose floating parameters and buffers are ``dtype``; the original is untouched.

    The copy is built tensor by tensor (never a full fp32 duplicate first), so peak memory is
    the original plus the cast; tied weights stay tied.
    """
    memo: dict[int, Any] = {}
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) in memo:
            continue
        data = t.detach().to(dtype) if t.is_floating_point() else t.detach().clone()
        memo[id(t)] = torch.nn.Parameter(data, requires_grad=False) if isinstance(t, torch.nn.Parameter) else data
    twin = copy.deepcopy(model, memo)
    twin.eval()
    for p in twin.parameters():
        p.requires_grad_(False)
    return twin


def prepare(loaded: LoadedModel, profile: Profile, device: str, *,
            allow_emulated_bf16: bool = False) -> CastModel | None:
    """The cast model a profile runs, or ``None`` for fp32 (the loaded model itself).

    Raises:
        DeviceError: bf16 on a CPU without native bf16 and no explicit opt-in; fp16 on CPU.
    """
    dtype = _DTYPES.get(profile.precision)
    if dtype is None:
        return None
    record: dict[str, Any] = {"weights_dtype": profile.precision, "inputs_dtype": profile.precision,
                              "outputs_dtype": "fp32", "method": "weights cast once (no autocast)"}
    if device == "cpu":
        if profile.precision == "fp16":
            raise DeviceError("fp16 on CPU has no fast kernels (it would be slower than fp32); use profile 'fast' "
                              "with bf16 on a CPU with native bf16, or profile 'strict'")
        support = cpu_bf16_support()
        env = _assumed_by_env()
        record["cpu_bf16"] = support.to_dict()
        record["native_bf16"] = support.native
        record["emulated_bf16_allowed_by"] = (None if support.native else f"{ASSUME_ENV}=1" if env
                                              else "Engine(allow_emulated_bf16=True)" if allow_emulated_bf16 else None)
        if not support.native and record["emulated_bf16_allowed_by"] is None:
            raise _refusal(support)
        if not support.native:
            _logger.warning("running bf16 without native bf16 on this CPU (%s, allowed by %s): expect it slower "
                            "than fp32", support.cpu, record["emulated_bf16_allowed_by"])
    twin = cast_copy(loaded.model, dtype)
    record["cast_fingerprint"] = integrity.state_fingerprint(twin)
    return CastModel(twin, dtype, record)
