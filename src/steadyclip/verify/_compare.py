"""Compare a stored row with its recomputation, and the run that made a file with this one.

Verdicts, from best to worst: ``bitwise`` (every stored number equal), ``drift`` (not equal, the
numerics facts differ between then and now, and within the profile's tolerance), ``mismatch``,
``input_changed`` (the input's SHA-256 differs), ``input_missing``. Rows recomputed with other
weights than the recorded ones are never ``drift``: the weights are the model, not numerics.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from steadyclip.numerics.identity import NUMERICS_FLAG_KEYS, file_provenance
from steadyclip.verify._source import StoredRow

__all__ = ["VERDICTS", "FactDiff", "Missing", "Recomputed", "RowVerdict", "fact_differences", "row_verdict"]

VERDICTS = ("bitwise", "drift", "mismatch", "input_changed", "input_missing")
_TOP_FIELDS = ("model_id", "weights_sha256", "fingerprint", "profile", "precision", "device", "micro_batch",
               "batch_path", "text_micro_batch", "text_batch_path", "text_buckets")
# the torch build and CPU facts that decide strict's bits (MKL and ATen pick kernels per CPU)
_BUILD_FIELDS = ("torch", "cuda", "cudnn", "mkl", "onednn", "cpu_capability", "cpu_vendor", "cpu_model")


@dataclass(frozen=True)
class FactDiff:
    """One fact that differs between the run that made the file (``then``) and this one (``now``)."""

    fact: str
    then: Any
    now: Any
    kind: str  # "numerics" (may change bits) | "execution" (layout: speed only)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Recomputed:
    """A row computed now: the input's digest, and its numbers or typed error."""

    sha256: str | None
    error_type: str | None
    top_labels: tuple[str, ...] | None = None
    probs_by_label: Mapping[str, float] | None = None
    numbers: Mapping[str, np.ndarray] | None = None


@dataclass(frozen=True)
class Missing:
    """A row whose input cannot be had now, and what to do about it."""

    reason: str


@dataclass(frozen=True)
class RowVerdict:
    """The verdict for one checked row."""

    index: int
    source: str
    verdict: str
    reason: str | None = None
    max_abs: float | None = None
    min_cosine: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _facts(prov: Mapping[str, Any]) -> dict[str, tuple[Any, str]]:
    flags = prov.get("flags") or {}
    build = flags.get("build") or {}
    out: dict[str, tuple[Any, str]] = {k: (prov.get(k), "numerics") for k in _TOP_FIELDS}
    out |= {f"versions.{k}": (v, "numerics") for k, v in (prov.get("versions") or {}).items()}
    out |= {f"flags.{k}": (flags.get(k), "numerics") for k in NUMERICS_FLAG_KEYS}
    out |= {f"build.{k}": (build.get(k), "numerics") for k in _BUILD_FIELDS}
    out |= {"threads": (prov.get("threads"), "execution"), "build.cpu_count": (build.get("cpu_count"), "execution")}
    return out


def fact_differences(then: Mapping[str, Any], now: Mapping[str, Any], *, then_replicas: Any = None,
                     now_replicas: Any = None) -> list[FactDiff]:
    """Every fact that differs between two provenance documents, numerics first."""
    # a portable result records no machine facts (its bits do not depend on them): compare like with like
    a, b = _facts(file_provenance(dict(then))), _facts(file_provenance(dict(now)))
    diffs = [FactDiff(k, a.get(k, (None, kind))[0], b.get(k, (None, kind))[0], kind)
             for k, (_, kind) in sorted({**a, **b}.items())
             if a.get(k, (None,))[0] != b.get(k, (None,))[0]]
    if then_replicas is not None and then_replicas != now_replicas:  # recipes no longer record it
        diffs.append(FactDiff("replicas", then_replicas, now_replicas, "execution"))
    return sorted(diffs, key=lambda d: (d.kind != "numerics", d.fact))


def row_verdict(stored: StoredRow, now: Recomputed | Missing | None, *, numerics_differ: bool,
                tolerance: Mapping[str, float], other_weights: str | None = None) -> RowVerdict:
    """The verdict for one row; ``now`` is ``None`` (or a :class:`Missing`) when its input is missing.

    ``other_weights`` says how the weights differ from the recorded ones, when they do: a row that is
    not bitwise is then a ``mismatch`` whatever the tolerance.
    """
    def verdict(v: str, reason: str | None = None, **figures: float | None) -> RowVerdict:
        return RowVerdict(stored.index, stored.source, v, reason, **figures)

    if now is None:
        return verdict("input_missing", "the input file is gone (pass --images-root if it moved)")
    if isinstance(now, Missing):
        return verdict("input_missing", now.reason)
    if stored.sha256 is not None and now.sha256 != stored.sha256:
        return verdict("input_changed", f"sha256 {stored.sha256[:12]} then, {str(now.sha256)[:12]} now")
    if stored.error_type is not None or now.error_type is not None:
        if stored.error_type == now.error_type:
            return verdict("bitwise")
        return verdict("mismatch", f"{stored.error_type or 'a result'} then, {now.error_type or 'a result'} now")
    equal, max_abs, min_cos = _numbers(stored, now)
    if equal:
        return verdict("bitwise")
    if other_weights is not None:
        return verdict("mismatch", other_weights, max_abs=max_abs, min_cosine=min_cos)
    within = max_abs <= tolerance["max_abs"] and (min_cos is None or min_cos >= tolerance["min_cosine"])
    if numerics_differ and within:
        return verdict("drift", "within tolerance; the numerics facts differ", max_abs=max_abs, min_cosine=min_cos)
    why = "beyond tolerance" if not within else "the numbers differ with the same numerics"
    return verdict("mismatch", why, max_abs=max_abs, min_cosine=min_cos)


def _numbers(stored: StoredRow, now: Recomputed) -> tuple[bool, float, float | None]:
    """(every stored number bitwise equal, max |d|, min cosine over the vectors)."""
    equal = stored.top_labels == now.top_labels if stored.top_labels is not None else True
    max_abs, min_cos = 0.0, None
    have = dict(now.numbers or {})
    if stored.top_labels is not None and "top_probs" in stored.numbers:
        by_label = now.probs_by_label or {}
        have["top_probs"] = np.asarray([by_label.get(lab, np.nan) for lab in stored.top_labels], dtype=np.float64)
    for name, then in stored.numbers.items():
        cur = have.get(name)
        if cur is None or cur.shape != then.shape:
            return False, float("inf"), None
        if not np.array_equal(then, cur):
            equal = False
        d = np.abs(then.astype(np.float64) - cur.astype(np.float64))
        max_abs = max(max_abs, float(np.nanmax(d)) if d.size and not np.isnan(d).any() else
                      (float("inf") if d.size else 0.0))
        if name != "top_probs" and then.size:
            cos = _cosine(then, cur)
            min_cos = cos if min_cos is None else min(min_cos, cos)
    return equal, max_abs, min_cos


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    denom = float(np.linalg.norm(a64) * np.linalg.norm(b64))
    return float(a64 @ b64) / denom if denom else (1.0 if np.array_equal(a64, b64) else 0.0)
