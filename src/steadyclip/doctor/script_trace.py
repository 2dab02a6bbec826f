"""Reading what the observer recorded in one run of the user's script, and comparing runs.

A run's trace is JSON lines (see ``_script_child/observer.py``); this module
turns it into frozen records and answers the questions the diagnosis asks:
which outputs changed between runs (from the first call on), what the
zero-shot probabilities were, what the script did to its model.
"""
from __future__ import annotations

import base64
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from steadyclip.doctor.harness import zero_shot
from steadyclip.errors import InputError
from steadyclip.numerics.head import ZeroShotHead

__all__ = ["Call", "ModelRecord", "RunTrace", "Where", "first_divergence", "prob_spread", "read_trace"]


@dataclass(frozen=True)
class Where:
    """A place in the user's code."""

    file: str | None
    line: int | None
    code: str | None = None

    def __str__(self) -> str:
        if self.file is None:
            return "<unknown>"
        return f"{os.path.basename(self.file)}:{self.line}"

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "line": self.line, "code": self.code, "at": str(self)}

    @classmethod
    def of(cls, d: dict[str, Any] | None) -> Where:
        d = d or {}
        return cls(d.get("file"), d.get("line"), d.get("code"))


@dataclass(frozen=True)
class Call:
    """One top-level encode_image / encode_text / forward of an open_clip model."""

    seq: int
    model: int
    kind: str
    where: Where
    training: bool
    layers: tuple[dict[str, Any], ...]
    layer_count: int
    autocast: dict[str, str | None]
    flags: dict[str, Any]
    weights: str
    device: str
    digests: tuple[str, ...]
    outputs: tuple[np.ndarray | None, ...]
    logit_scale: float | None
    logit_bias: float | None  # SigLIP's; None for CLIP
    transforms_used: dict[str, int]
    texts: tuple[str, ...] | None

    @property
    def site(self) -> str:
        return f"{self.kind} at {self.where}"


@dataclass(frozen=True)
class ModelRecord:
    """A model an open_clip factory created, and the weights loaded into it."""

    index: int
    fn: str | None
    arch: str | None
    pretrained: Any
    where: Where | None
    loads: tuple[dict[str, Any], ...] = ()
    transforms: dict[str, list[str]] = field(default_factory=dict)

    @property
    def weights_loaded(self) -> bool:
        return bool(self.loads)


@dataclass(frozen=True)
class RunTrace:
    """Everything one run of the script showed: its output, exit status, time and the observer's records."""

    fixes: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    models: dict[int, ModelRecord]
    calls: tuple[Call, ...]
    versions: dict[str, Any]

    @property
    def signature(self) -> tuple[str, ...]:
        """Every output digest in call order: two runs agree bitwise iff their signatures are equal."""
        return tuple(d for c in self.calls for d in c.digests)

    def probabilities(self) -> np.ndarray | None:
        """Zero-shot probabilities (images x texts) from the last image and text embeddings the script computed."""
        img = next((c for c in reversed(self.calls) if c.kind in ("encode_image", "forward") and c.outputs), None)
        txt = next((c for c in reversed(self.calls) if c.kind == "encode_text" and c.outputs), None)
        if img is None:
            return None
        a = img.outputs[0]
        b = txt.outputs[0] if txt is not None else (img.outputs[1] if len(img.outputs) > 1 else None)
        if a is None or b is None or a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
            return None
        scorer = txt or img
        if scorer.logit_scale is None:
            return None  # not a CLIP/SigLIP model: no zero-shot head to score with
        a64, b64 = a.astype(np.float64), b.astype(np.float64)
        a64 /= np.linalg.norm(a64, axis=1, keepdims=True) + 1e-12
        b64 /= np.linalg.norm(b64, axis=1, keepdims=True) + 1e-12
        return zero_shot(ZeroShotHead(scale=scorer.logit_scale, bias=scorer.logit_bias), a64, b64)  # (N, C)

    def labels(self) -> tuple[str, ...] | None:
        txt = next((c for c in reversed(self.calls) if c.texts), None)
        return txt.texts if txt is not None else None


def _array(o: dict[str, Any]) -> np.ndarray | None:
    if not o.get("data"):
        return None
    return np.frombuffer(base64.b64decode(o["data"]), dtype=np.float32).reshape(o["shape"])


def _call(e: dict[str, Any]) -> Call:
    outs = e.get("outputs") or []
    texts = e.get("texts")
    return Call(
        seq=int(e["seq"]), model=int(e["model"]), kind=str(e["kind"]), where=Where.of(e.get("where")),
        training=bool(e.get("training")), layers=tuple(e.get("layers") or ()), layer_count=int(e.get("layer_count", 0)),
        autocast=dict(e.get("autocast") or {}), flags=dict(e.get("flags") or {}),
        weights=str(e.get("weights_pinned") or e.get("weights")), device=str(e.get("device", "cpu")),
        digests=tuple(str(o["digest"]) for o in outs), outputs=tuple(_array(o) for o in outs),
        logit_scale=e.get("logit_scale"), logit_bias=e.get("logit_bias"), transforms_used=dict(e.get("transforms_used") or {}),
        texts=tuple(texts) if texts else None,
    )


def read_trace(path: Path, *, returncode: int, stdout: str, stderr: str, seconds: float) -> RunTrace:
    """Parse one run's trace file (a missing file: the script never reached the observer)."""
    models: dict[int, dict[str, Any]] = {}
    loads: dict[int, list[dict[str, Any]]] = {}
    transforms: dict[int, dict[str, list[str]]] = {}
    calls: list[Call] = []
    versions: dict[str, Any] = {}
    fixes: tuple[str, ...] = ()
    lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else []
    for line in lines:
        try:
            e = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(f"the observer's trace {path} has a broken line ({err}); was it written to twice?") from err
        kind = e.get("event")
        if kind == "start":
            fixes, versions["python"] = tuple(e.get("fixes") or ()), e.get("python")
        elif kind == "import":
            versions.update(open_clip=e.get("version"), torch=e.get("torch"))
        elif kind == "model":
            models[int(e["model"])] = e
        elif kind == "weights":
            loads.setdefault(int(e["model"]), []).append(e)
        elif kind == "transforms":
            transforms[int(e["model"])] = {k: v for k, v in e.items() if k in ("train", "eval")}
        elif kind == "call":
            calls.append(_call(e))
    indices = set(models) | set(loads) | {c.model for c in calls}
    records = {k: ModelRecord(k, models.get(k, {}).get("fn"), models.get(k, {}).get("arch"),
                              models.get(k, {}).get("pretrained"),
                              Where.of(models[k]["where"]) if k in models else None,
                              tuple(loads.get(k, ())), transforms.get(k, {})) for k in sorted(indices)}
    return RunTrace(fixes, returncode, stdout, stderr, seconds, records, tuple(calls), versions)


def first_divergence(runs: Sequence[RunTrace]) -> dict[str, Any] | None:
    """The first call whose output differs between runs (``None``: every output bitwise equal)."""
    if len(runs) < 2:
        return None
    ref = runs[0]
    for i, call in enumerate(ref.calls):
        for r in runs[1:]:
            other = r.calls[i] if i < len(r.calls) else None
            if other is None or other.digests != call.digests:
                changed = sum(1 for j, c in enumerate(ref.calls)
                              if any(j >= len(x.calls) or x.calls[j].digests != c.digests for x in runs[1:]))
                return {"call": i + 1, "site": call.site, "at": str(call.where), "code": call.where.code,
                        "calls_changed": changed, "calls_total": len(ref.calls)}
    if any(len(r.calls) != len(ref.calls) for r in runs):
        return {"call": len(ref.calls) + 1, "site": "the number of calls", "at": None, "code": None,
                "calls_changed": 1, "calls_total": len(ref.calls)}
    return None


def prob_spread(runs: Sequence[RunTrace]) -> float | None:
    """The largest change of any probability between runs (``None``: no probabilities to compare)."""
    probs = [r.probabilities() for r in runs]
    if any(p is None for p in probs) or not probs:
        return None
    shapes = {p.shape for p in probs if p is not None}
    if len(shapes) != 1:
        return math.inf
    stack = np.stack([p for p in probs if p is not None])
    return float((stack.max(axis=0) - stack.min(axis=0)).max())
