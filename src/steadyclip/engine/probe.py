"""Behaviour pinning: a fixed probe whose outputs a lockfile stores and ``verify`` recomputes.

The probe is a deterministic set of synthetic images (drawn with numpy, then
passed through the model's own preprocessing, so resizing is covered too) and
a few texts. Outputs are stored exactly (little-endian float32, base64). On the
same software stack a re-run must be bitwise identical; on another stack
(other CPU, GPU, torch version) the measured drift is reported against tolerances.

A ``fast`` (bf16/fp16) lock pins fast outputs the same way: bitwise on its own stack (fast is
deterministic across processes at a fixed shape and thread count), within the wider
:data:`FAST_TOLERANCE` elsewhere (another bf16 kernel rounds differently); its probe section
also carries the drift from strict measured when it was written.
"""
from __future__ import annotations

import base64
import logging
import platform
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from steadyclip._util.digest import sha256_array
from steadyclip.engine.probe_inputs import PROBE_TEXTS, probe_images
from steadyclip.engine.settings import EngineSettings
from steadyclip.numerics import identity

if TYPE_CHECKING:
    from steadyclip.engine.facade import Engine

_logger = logging.getLogger(__name__)

PROBE_VERSION = 1
# Across stacks, fp32 CLIP embeddings typically move ~1e-6..1e-5; more is a behaviour change.
DEFAULT_TOLERANCE = {"max_abs": 1e-4, "min_cosine": 0.9999}
# bf16 keeps ~3 significant digits: fp32 vs bf16 probe rows measured min cosine 0.99995 (demo) and
# 0.99994 (ViT-B-32); two bf16 stacks are each that far from fp32, so allow about twice it.
FAST_TOLERANCE = {"max_abs": 2e-2, "min_cosine": 0.9995}


_LATER_KEYS = ("cpu_vendor", "cpu_model")


def tolerance_for(precision: str) -> dict[str, float]:
    """The cross-stack tolerance for a probe run at ``precision``."""
    return dict(DEFAULT_TOLERANCE if precision == "fp32" else FAST_TOLERANCE)


def stack_id(engine: Engine) -> dict[str, str]:
    """What must match for a bitwise comparison to be meaningful: the software stack, CPU and shapes."""
    build = engine.provenance.flags.get("build", {})
    return {
        **identity.software_stack(),
        "device": str(engine.device), "cpu_capability": str(build.get("cpu_capability")),
        "cpu_vendor": str(build.get("cpu_vendor")), "cpu_model": str(build.get("cpu_model")),
        "machine": platform.machine(), "profile": engine.profile.name, "threads": str(engine.threads),
        "micro_batch": str(engine.micro_batch), "precision": engine.profile.precision,
        "bf16": _bf16_kind(engine),
    }


def _bf16_kind(engine: Engine) -> str:
    """"native" | "emulated" | "n/a": emulated and native bf16 are different kernels, so different stacks."""
    rp = engine.provenance.reduced_precision
    if not rp or "native_bf16" not in rp:
        return "n/a"
    return "native" if rp["native_bf16"] else "emulated"


def _pack(arr: np.ndarray) -> dict[str, Any]:
    raw = np.ascontiguousarray(arr, dtype="<f4").tobytes()
    return {"shape": list(arr.shape), "sha256": sha256_array(arr, "<f4"),
            "data": base64.b64encode(raw).decode("ascii")}


def _unpack(doc: dict[str, Any]) -> np.ndarray:
    raw = base64.b64decode(doc["data"])
    if len(raw) % 4 or sha256_array(np.frombuffer(raw, dtype="<f4")) != doc["sha256"]:
        from steadyclip.errors import IntegrityError

        raise IntegrityError("the lockfile's probe data does not match its own hash; the lock was edited or corrupted")
    return np.frombuffer(raw, dtype="<f4").reshape(doc["shape"])


def run_probe(engine: Engine) -> dict[str, Any]:
    """The probe section of a lockfile: exact outputs plus the stack they came from."""
    images = engine.embed_images(probe_images(engine.loaded.info.preprocess.size))
    texts = engine.embed_texts(list(PROBE_TEXTS))
    doc = {"version": PROBE_VERSION, "stack": stack_id(engine), "settings": engine.settings.to_dict(),
           "tolerance": tolerance_for(engine.profile.precision), "images": _pack(images), "texts": _pack(texts)}
    rp = engine.provenance.reduced_precision
    if rp is not None:
        doc["drift_vs_strict"] = rp["drift_vs_strict"]
    if engine.profile.name == "portable":  # golden digests for other machines (engine.portable_proof)
        from steadyclip.engine.portable_proof import stack_key
        from steadyclip.numerics.cpuid import cpu_facts

        doc["portable_stack"], doc["cpu"] = stack_key(engine._core), cpu_facts()
    return doc


@dataclass(frozen=True)
class ProbeReport:
    """Outcome of recomputing a stored probe."""

    status: str  # "bitwise-identical" | "within-tolerance" | "drift" | "regression"
    same_stack: bool
    max_abs: float
    min_cosine: float
    stack_differences: dict[str, tuple[str, str]]
    tolerance: dict[str, float]

    @property
    def ok(self) -> bool:
        return self.status in ("bitwise-identical", "within-tolerance")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        if self.status == "bitwise-identical":
            return "behaviour probe: bitwise identical to the lock"
        diffs = ", ".join(f"{k}: {a} -> {b}" for k, a, b in
                          ((k, *v) for k, v in sorted(self.stack_differences.items()))) or "none"
        return (f"behaviour probe: {self.status}; max |diff| {self.max_abs:.3g}, min cosine {self.min_cosine:.8f} "
                f"(tolerance {self.tolerance}); stack differences: {diffs}")


def probe_settings(stored: dict[str, Any]) -> EngineSettings:
    """The engine settings a stored probe was computed with (locks before settings were stored: from its stack)."""
    if "settings" in stored:
        return EngineSettings.from_dict(stored["settings"])
    stack = stored.get("stack", {})
    threads = stack.get("threads")
    # written before texts ran in buckets: 32 rows at the context length
    return EngineSettings(profile=str(stack.get("profile", "strict")), micro_batch=int(stack.get("micro_batch", 8)),
                          threads=int(threads) if threads else None, text_micro_batch=32, text_buckets="full")


def compare_probe(stored: dict[str, Any], engine: Engine) -> ProbeReport:
    """Recompute the probe and compare with the stored outputs.

    On the stack the lock was written on, anything short of bitwise identity is
    a ``regression``; on another stack, drift inside the tolerance is accepted.
    """
    fresh = run_probe(engine)
    old_stack: dict[str, str] = dict(stored.get("stack", {}))
    if old_stack.get("profile") == "strict":  # locks written before the precision keys existed were fp32
        old_stack = {"precision": "fp32", "bf16": "n/a", **old_stack}
    if "python" not in old_stack:  # written before the stack was identity.software_stack(): of it, only
        old_stack = {**identity.software_stack(), **old_stack}  # torch, numpy and pillow were recorded
    # the CPU's vendor and model were recorded from 2026-12-07 on: older locks say nothing of them
    diffs = {k: (old_stack.get(k, "?"), v) for k, v in fresh["stack"].items()
             if old_stack.get(k) != v and (k in old_stack or k not in _LATER_KEYS)}
    tol = {**tolerance_for(engine.profile.precision), **stored.get("tolerance", {})}
    max_abs, min_cos = 0.0, 1.0
    identical = True
    for part in ("images", "texts"):
        a, b = _unpack(stored[part]), _unpack(fresh[part])
        if a.shape != b.shape:
            return ProbeReport("drift", not diffs, float("inf"), -1.0, diffs, tol)
        identical &= a.tobytes() == b.tobytes()
        max_abs = max(max_abs, float(np.abs(a.astype(np.float64) - b).max(initial=0.0)))
        cos = (a.astype(np.float64) * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
        min_cos = min(min_cos, float(cos.min(initial=1.0)))
    if identical:
        status = "bitwise-identical"
    elif not diffs:
        status = "regression"
    elif max_abs <= tol["max_abs"] and min_cos >= tol["min_cosine"]:
        status = "within-tolerance"
    else:
        status = "drift"
    _logger.info("probe comparison: %s (max abs %.3g)", status, max_abs)
    return ProbeReport(status, not diffs, max_abs, min_cos, diffs, tol)
