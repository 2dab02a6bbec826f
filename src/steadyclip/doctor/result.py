"""What a diagnosis returns: causes with evidence and fixes, the runs, the verdict.

Thresholds (why these numbers):

- ``PROB_TOL = 1e-6``: a *behavioural* cause (train mode, stochastic layers,
  mutated buffers, autocast in use, a different preprocess) is a problem once it
  moves any probability by more than this. Below it, the effect is at the level
  of float32 rounding of a softmax and nobody's answer changes.
- ``NUMERIC_TOL = 1e-4``: an *environmental* numeric effect (batch size, batch
  position, thread count, device, numerics flags) is only reported as ``info``
  up to this size. Such effects are typically 1e-7..1e-5 on CPU (DESIGN.md),
  are deterministic for a fixed setup, and steadyclip's engine removes them by
  fixing the batch shape and thread count. Above 1e-4 they show in the 4th
  decimal people print and compare, so they become problems.
- Structural facts need no threshold: stochastic layers active in train mode,
  weights that differ between loads or from a pinned hash, buffers that a
  forward overwrote, NaN/Inf - each makes the verdict ``unstable``.

The verdict is ``"unstable"`` when any cause has level ``"problem"``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = [
    "NUMERIC_TOL",
    "PROB_TOL",
    "Cause",
    "CheckStatus",
    "Diagnosis",
    "Level",
    "Run",
    "jsonable",
    "rank_causes",
]

PROB_TOL = 1e-6
NUMERIC_TOL = 1e-4

Level = Literal["problem", "info"]
Status = Literal["problem", "info", "ok", "skipped"]

# Tie-break when severities are equal: root causes before their consequences.
_PRIORITY: tuple[str, ...] = (
    "weights_corrupted",
    "random_init",
    "weights_changed",
    "non_finite",
    "train_mode",
    "stochastic_layers",
    "buffers_mutated",
    "preprocess_random",
    "preprocess_mismatch",
    "precision_drift",
    "nondeterministic_flags",
    "device_drift",
    "cross_machine_numerics",
    "thread_variance",
    "batch_variance",
)


@dataclass(frozen=True)
class Cause:
    """One reason results move, with what was measured and how to fix it.

    Attributes:
        id: stable identifier, e.g. ``"train_mode"``.
        severity: the largest absolute change of any probability this cause was
            measured to produce, or ``None`` where it cannot be measured (a hash
            mismatch: the right weights are not at hand; NaN outputs).
        level: ``"problem"`` (makes the verdict unstable) or ``"info"``.
        summary: one human sentence.
        evidence: the measurements: numbers, module paths, hashes.
        fix: a concrete code snippet or command.
    """

    id: str
    severity: float | None
    level: Level
    summary: str
    evidence: dict[str, Any]
    fix: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "severity": _finite_or_none(self.severity),
            "level": self.level,
            "summary": self.summary,
            "evidence": jsonable(self.evidence),
            "fix": self.fix,
        }


@dataclass(frozen=True)
class CheckStatus:
    """What happened to one check: found a problem, found something minor, passed, or skipped (with why)."""

    id: str
    status: Status
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "status": self.status, "detail": self.detail}


@dataclass(frozen=True)
class Run:
    """One repetition: each image's probabilities over the labels, as the user's code ran vs after the fixes.

    ``as_is`` is ``None`` when the forward failed as-is (``error`` says why).
    """

    index: int
    as_is: tuple[tuple[float, ...], ...] | None
    fixed: tuple[tuple[float, ...], ...]
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "as_is": None if self.as_is is None else [[_finite_or_none(p) for p in row] for row in self.as_is],
            "fixed": [[_finite_or_none(p) for p in row] for row in self.fixed],
            "error": self.error,
        }


@dataclass(frozen=True)
class Diagnosis:
    """The result of :func:`steadyclip.diagnose`.

    Attributes:
        verdict: ``"stable"`` or ``"unstable"``.
        causes: problems first, each group ranked by severity (largest first).
        runs: each run's probabilities as-is vs after applying every fix.
        environment: versions, threads, MKL_CBWR, device, flags.
        checks: every check that ran, passed or was skipped, with why.
        labels: the label of each probability column.
        images: a display name for each image row.
        advice: good practice that was measured to change nothing here (``diagnose_script``): not a cause.
    """

    verdict: Literal["stable", "unstable"]
    causes: tuple[Cause, ...]
    runs: tuple[Run, ...]
    environment: dict[str, Any]
    checks: tuple[CheckStatus, ...] = ()
    labels: tuple[str, ...] = ()
    images: tuple[str, ...] = ()
    advice: tuple[Cause, ...] = ()

    @property
    def stable(self) -> bool:
        return self.verdict == "stable"

    @property
    def problems(self) -> tuple[Cause, ...]:
        return tuple(c for c in self.causes if c.level == "problem")

    @property
    def top(self) -> Cause | None:
        """The highest-ranked cause (a problem if there is one), or ``None``."""
        return self.causes[0] if self.causes else None

    def cause(self, cause_id: str) -> Cause | None:
        """The cause with this id, if it was found."""
        return next((c for c in self.causes if c.id == cause_id), None)

    def to_dict(self) -> dict[str, Any]:
        """The stable JSON schema: verdict, causes, runs, environment (+ checks, labels, images)."""
        return {
            "verdict": self.verdict,
            "causes": [c.to_dict() for c in self.causes],
            "runs": [r.to_dict() for r in self.runs],
            "environment": jsonable(self.environment),
            "checks": [c.to_dict() for c in self.checks],
            "labels": list(self.labels),
            "images": list(self.images),
            "advice": [c.to_dict() for c in self.advice],
        }


def rank_causes(causes: list[Cause]) -> tuple[Cause, ...]:
    """Problems before info; within each, unmeasurable (None) first, then by severity, then root causes first."""

    def key(c: Cause) -> tuple[int, float, int]:
        sev = math.inf if c.severity is None else c.severity
        prio = _PRIORITY.index(c.id) if c.id in _PRIORITY else len(_PRIORITY)
        return (0 if c.level == "problem" else 1, -sev, prio)

    return tuple(sorted(causes, key=key))


def _finite_or_none(x: float | None) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def jsonable(obj: Any) -> Any:
    """Evidence as plain JSON: tuples -> lists, numpy scalars -> Python, NaN/Inf -> None."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, int):
        return obj
    if isinstance(obj, float):
        return _finite_or_none(obj)
    item = getattr(obj, "item", None)  # numpy / torch scalars
    if callable(item):
        try:
            return jsonable(item())
        except (ValueError, RuntimeError):
            pass
    return str(obj)


def verdict_of(causes: tuple[Cause, ...]) -> Literal["stable", "unstable"]:
    return "unstable" if any(c.level == "problem" for c in causes) else "stable"


@dataclass
class Findings:
    """Mutable collector the checks append to while a diagnosis runs."""

    causes: list[Cause] = field(default_factory=list)
    checks: list[CheckStatus] = field(default_factory=list)

    def add(self, cause: Cause) -> None:
        self.checks = [c for c in self.checks if not (c.id == cause.id and c.status == "ok")]
        self.causes.append(cause)
        self.checks.append(CheckStatus(cause.id, cause.level, cause.summary))

    def ok(self, check_id: str, detail: str) -> None:
        self.checks.append(CheckStatus(check_id, "ok", detail))

    def skipped(self, check_id: str, reason: str) -> None:
        self.checks.append(CheckStatus(check_id, "skipped", reason))
