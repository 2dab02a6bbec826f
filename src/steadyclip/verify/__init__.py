"""Prove an old result: recompute rows of a result file and compare them with what it stores.

    >>> report = steadyclip.verify_results("results.parquet", sample=32)
    >>> report.verdict, report.totals

A result names its model (weights SHA-256 recorded), engine settings, labels, templates and
the SHA-256 of every input; :func:`verify_results` loads that model once, recomputes a seeded,
stratified sample of rows (or all) batched through the engine, and gives each row a verdict
(:mod:`steadyclip.verify._compare`). The report also lists the facts that differ between the run
that made the file and this one (weights, profile, versions, torch build, CPU, layout). An
OpenAI-style ``/v1/embeddings`` answer holds only its inputs' digests: the inputs come from the
request the client sent (``inputs=``, :mod:`steadyclip.verify._inputs`).
"""
from __future__ import annotations

import itertools
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from steadyclip.engine.probe import tolerance_for
from steadyclip.errors import InputError
from steadyclip.verify._compare import (
    VERDICTS,
    FactDiff,
    RowVerdict,
    fact_differences,
    row_verdict,
)
from steadyclip.verify._inputs import join_inputs, read_inputs
from steadyclip.verify._recompute import build_engine, recompute
from steadyclip.verify._source import ResultFile, read_result

__all__ = ["DEFAULT_SAMPLE", "FactDiff", "RowVerdict", "VerifyReport", "select_rows", "verify_results"]

DEFAULT_SAMPLE = 32
_PASSING = ("bitwise", "drift")


@dataclass(frozen=True)
class VerifyReport:
    """What :func:`verify_results` found: a verdict per checked row, totals, and what changed since."""

    path: Path
    kind: str  # "batch" | "classify" | "embed" | "embeddings" (an OpenAI-style answer)
    verdict: str  # the worst row verdict ("bitwise" when every row is)
    rows: tuple[RowVerdict, ...]
    total_rows: int
    sample: dict[str, Any]  # {"mode": "sample" | "all", "size": n, "seed": s}
    tolerance: dict[str, float]
    differences: tuple[FactDiff, ...] = ()
    model: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """Every checked row is ``bitwise`` or ``drift`` (the CLI exits 0)."""
        return self.verdict in _PASSING

    @property
    def totals(self) -> dict[str, int]:
        return {v: sum(r.verdict == v for r in self.rows) for v in VERDICTS}

    def to_dict(self) -> dict[str, Any]:
        """The JSON document ``steadyclip verify RESULT --json`` prints."""
        return {"verdict": self.verdict, "ok": self.ok, "path": str(self.path), "kind": self.kind,
                "checked": len(self.rows), "total_rows": self.total_rows, "sample": self.sample,
                "totals": self.totals, "tolerance": self.tolerance, "model": self.model,
                "rows": [r.to_dict() for r in self.rows],
                "differences": [d.to_dict() for d in self.differences if d.kind == "numerics"],
                "execution_differences": [d.to_dict() for d in self.differences if d.kind == "execution"]}


def select_rows(n: int, sample: int | None, seed: int = 0) -> list[int]:
    """Row positions to check: all (``sample=None`` or ``>= n``), else one seeded pick per equal stratum."""
    if sample is None or sample >= n:
        return list(range(n))
    if isinstance(sample, bool) or not isinstance(sample, int) or sample < 1:
        raise InputError(f"sample must be an int >= 1 or None (every row), got {sample!r}")
    rng = np.random.default_rng(seed)
    edges = np.linspace(0, n, sample + 1).astype(int)
    return [int(rng.integers(lo, hi)) for lo, hi in itertools.pairwise(edges)]


def verify_results(
    path: str | os.PathLike[str],
    *,
    sample: int | None = DEFAULT_SAMPLE,
    seed: int = 0,
    images_root: str | os.PathLike[str] | None = None,
    model: str | None = None,
    pretrained: str | None = None,
    inputs: str | os.PathLike[str] | Sequence[str] | None = None,
) -> VerifyReport:
    """Recompute rows of a result file (batch Parquet, ``classify``/``embed --json``, a server answer) and judge them.

    Args:
        path: the result file.
        sample: rows to check (seeded, stratified over the file); ``None`` checks every row.
        seed: the sample's seed.
        images_root: where the inputs are now, when they moved since the result was made.
        model, pretrained: load the model from here instead of where the result says. Weights with
            another SHA-256 than the recorded one are a difference in the report (``weights_sha256``),
            and every row they do not reproduce bitwise is ``mismatch``.
        inputs: an OpenAI-style ``/v1/embeddings`` answer's inputs: the path of the JSON body the
            client sent (or of a JSON list of its inputs), or the list of texts / image data URIs.
            Without them its rows are ``input_missing``.
    Returns:
        A :class:`VerifyReport`; ``report.ok`` when every checked row is ``bitwise`` or ``drift``.
    Raises:
        ResultFileError: not a steadyclip result, truncated, or edited into nonsense.
        ModelSourceError: the model the result names cannot be found.
        InputError: ``inputs`` unreadable, or not this answer's request (another count or modality).

    Example:
        >>> steadyclip.verify_results("results.parquet", sample=None).verdict
        'bitwise'
    """
    result, given = join_inputs(read_result(path), None if inputs is None else read_inputs(inputs))
    picked = [result.rows[i] for i in select_rows(len(result.rows), sample, seed)]
    with build_engine(result, model, pretrained) as engine:
        now = engine.provenance.to_dict()
        recomputed = recompute(engine, result, picked, images_root=images_root, given=given)
    then_replicas = (result.settings or {}).get("replicas")
    diffs = fact_differences(result.provenance, now, then_replicas=then_replicas,
                             now_replicas=engine.settings.replicas)
    numerics_differ = any(d.kind == "numerics" for d in diffs)
    tolerance = tolerance_for(str(result.provenance.get("precision", "fp32")))
    then_w, now_w = str(result.provenance.get("weights_sha256")), str(now.get("weights_sha256"))
    other = None if then_w == now_w else f"other weights: SHA-256 {then_w[:12]} then, {now_w[:12]} now"
    rows = tuple(row_verdict(s, r, numerics_differ=numerics_differ, tolerance=tolerance, other_weights=other)
                 for s, r in zip(picked, recomputed))
    return VerifyReport(Path(path), result.kind, _worst(rows), rows, len(result.rows),
                        {"mode": "all" if len(picked) == len(result.rows) else "sample", "size": len(picked),
                         "seed": seed}, tolerance, tuple(diffs), _model(result))


def _worst(rows: tuple[RowVerdict, ...]) -> str:
    found = {r.verdict for r in rows}
    for v in ("mismatch", "input_changed", "input_missing", "drift"):
        if v in found:
            return v
    return "bitwise"


def _model(result: ResultFile) -> dict[str, Any]:
    prov = result.provenance
    return {**result.model, "weights_sha256": prov.get("weights_sha256"), "profile": prov.get("profile")}
