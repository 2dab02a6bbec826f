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

__all__ = ["Call", "ModelRecord", "RunTrace", "Where", "change_between", "first_divergence", "output_change",
           "prob_spread", "read_trace"]


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
    finite: tuple[bool, ...] = ()
    nonfinite_weights: dict[str, Any] | None = None  # asked only when an output was NaN/Inf

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
    warnings: tuple[str, ...] = ()  # what open_clip warned while building it
    quick_gelu: dict[str, Any] | None = None  # the activation built vs the one its pretrained tag needs

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
    downloads: tuple[dict[str, Any], ...] = ()
    failures: tuple[dict[str, Any], ...] = ()  # create_failed / weights_failed / file_failed, in order

    @property
    def signature(self) -> tuple[str, ...]:
        """Every output digest in call order: two runs agree bitwise iff their signatures are equal."""
        return tuple(d for c in self.calls for d in c.digests)

    def probabilities(self) -> np.ndarray | None:
        """Zero-shot probabilities (images x classes) rebuilt from the last image and text embeddings.

        Classes are the rows of the ``encode_text`` calls (chunks of one label list are joined); a script
        that encodes each class's prompts in a call of its own (benchmark style: equal-sized calls, other
        texts each) gets one class per call, the mean of its normalised rows. A single class is no
        distribution (softmax over one text is always 1): ``None``.
        """
        img = next((c for c in reversed(self.calls) if c.kind in ("encode_image", "forward") and c.outputs), None)
        if img is None:
            return None
        a = img.outputs[0]
        b, scorer = self._classes(img)
        if a is None or b is None or a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or b.shape[0] < 2:
            return None
        if scorer.logit_scale is None:
            return None  # not a CLIP/SigLIP model: no zero-shot head to score with
        return zero_shot(ZeroShotHead(scale=scorer.logit_scale, bias=scorer.logit_bias), _unit(a), _unit(b))

    def _text_calls(self) -> list[Call]:
        return [c for c in self.calls if c.kind == "encode_text" and c.outputs and c.outputs[0] is not None
                and c.outputs[0].ndim == 2]

    def _per_class(self) -> bool:
        """Several encode_text calls of equal size: one class each (its prompts/templates), benchmark style."""
        texts = self._text_calls()
        return (len(texts) > 1 and len({(c.outputs[0].shape if c.outputs[0] is not None else None)
                                        for c in texts}) == 1
                and len({c.texts for c in texts}) == len(texts))  # the same labels encoded again are one list

    def _classes(self, img: Call) -> tuple[np.ndarray | None, Call]:
        texts = self._text_calls()
        if not texts:
            return (img.outputs[1] if len(img.outputs) > 1 else None), img
        rows = [c.outputs[0] for c in texts if c.outputs[0] is not None]
        if self._per_class():
            return np.stack([_unit(r).mean(axis=0) for r in rows]), texts[-1]
        if len({r.shape[1] for r in rows}) == 1 and len({c.texts for c in texts}) == len(texts):
            return np.concatenate(rows), texts[-1]  # chunks of one label list
        return rows[-1], texts[-1]

    def labels(self) -> tuple[str, ...] | None:
        texts = self._text_calls()
        if self._per_class():  # one class per encode_text call: its first prompt names it
            return tuple(c.texts[0] if c.texts else f"text call {i + 1}" for i, c in enumerate(texts))
        names = [t for c in texts for t in (c.texts or ())]
        probs = self.probabilities()
        if probs is not None and len(names) == probs.shape[1]:
            return tuple(names)
        txt = next((c for c in reversed(self.calls) if c.texts), None)
        return txt.texts if txt is not None else None


def _unit(a: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (float64): what CLIP compares, and what a change is measured on."""
    x: np.ndarray = a.astype(np.float64)
    if x.ndim == 0:
        return np.asarray(x / (abs(x) + 1e-12))
    return np.asarray(x / (np.linalg.norm(x, axis=-1, keepdims=True) + 1e-12))


def _array(o: dict[str, Any]) -> np.ndarray | None:
    if not o.get("data"):
        return None
    shape = list(o["shape"])
    if o.get("rows_sent") is not None and shape:
        shape[0] = int(o["rows_sent"])  # a large output: its first rows only
    return np.frombuffer(base64.b64decode(o["data"]), dtype=np.float32).reshape(shape)


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
        texts=tuple(texts) if texts else None, finite=tuple(bool(o.get("finite", True)) for o in outs),
        nonfinite_weights=e.get("nonfinite_weights"),
    )


def read_trace(path: Path, *, returncode: int, stdout: str, stderr: str, seconds: float) -> RunTrace:
    """Parse one run's trace file (a missing file: the script never reached the observer)."""
    models: dict[int, dict[str, Any]] = {}
    loads: dict[int, list[dict[str, Any]]] = {}
    transforms: dict[int, dict[str, list[str]]] = {}
    calls: list[Call] = []
    versions: dict[str, Any] = {}
    downloads: list[dict[str, Any]] = []
    failures: list[dict[str, Any]] = []
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
        elif kind == "download":
            downloads.append(e)
        elif kind in ("create_failed", "weights_failed", "file_failed"):
            failures.append(e)
    indices = set(models) | set(loads) | {c.model for c in calls}
    records = {k: ModelRecord(k, models.get(k, {}).get("fn"), models.get(k, {}).get("arch"),
                              models.get(k, {}).get("pretrained"),
                              Where.of(models[k]["where"]) if k in models else None,
                              tuple(loads.get(k, ())), transforms.get(k, {}),
                              tuple(models.get(k, {}).get("warnings") or ()), models.get(k, {}).get("quick_gelu"))
               for k in sorted(indices)}
    return RunTrace(fixes, returncode, stdout, stderr, seconds, records, tuple(calls), versions, tuple(downloads),
                    tuple(failures))


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


def _value_change(x: np.ndarray, y: np.ndarray) -> float:
    """Largest change of any value, rows at unit length; NaN against a number is an infinite change."""
    if x.shape != y.shape:
        return math.inf
    ux, uy = _unit(x), _unit(y)
    d = np.abs(ux - uy)
    both = np.isnan(ux) & np.isnan(uy)
    d = np.where(both, 0.0, np.where(np.isnan(d), math.inf, d))
    return float(d.max()) if d.size else 0.0


def output_change(a: RunTrace, b: RunTrace) -> float | None:
    """How far two runs' outputs are apart: every call the script made, every output, rows at unit length.

    This is measured on what the script really produced (features included), not only on the
    probabilities the doctor rebuilds. ``inf``: the runs made different calls or shapes;
    ``None``: the outputs differ but none of them travelled with its values (nothing to measure).
    """
    if len(a.calls) != len(b.calls):
        return math.inf
    best, unmeasured = 0.0, False
    for ca, cb in zip(a.calls, b.calls, strict=True):
        if ca.kind != cb.kind or len(ca.outputs) != len(cb.outputs):
            return math.inf
        for da, db, xa, xb in zip(ca.digests, cb.digests, ca.outputs, cb.outputs, strict=True):
            if da == db:
                continue
            if xa is None or xb is None:
                unmeasured = True
                continue
            best = max(best, _value_change(xa, xb))
    if best == 0.0 and unmeasured:
        return None
    return best


def change_between(a: Sequence[RunTrace], b: Sequence[RunTrace]) -> tuple[float | None, float | None]:
    """(largest output change, largest probability change) between any run of ``a`` and any run of ``b``."""
    out: float | None = None
    prob: float | None = None
    for x in a:
        for y in b:
            c = output_change(x, y)
            if c is not None:
                out = c if out is None else max(out, c)
            px, py = x.probabilities(), y.probabilities()
            if px is not None and py is not None:
                p = math.inf if px.shape != py.shape else _value_change_raw(px, py)
                prob = p if prob is None else max(prob, p)
    return out, prob


def _value_change_raw(x: np.ndarray, y: np.ndarray) -> float:
    d = np.abs(x - y)
    d = np.where(np.isnan(x) & np.isnan(y), 0.0, np.where(np.isnan(d), math.inf, d))
    return float(d.max()) if d.size else 0.0


@dataclass(frozen=True)
class Measured:
    """One intervention: the runs without it (everything else fixed) against the runs with all fixes."""

    fix: str
    needed: bool
    severity: float | None  # the larger of the output change and the spread without the fix
    spread_without: float | None  # how far the runs without it disagree with each other
    runs_without: int
    output_change: float | None = None  # features etc., rows at unit length
    prob_change: float | None = None  # the probabilities the doctor rebuilt, when it could
    runs_disagree: bool = False
