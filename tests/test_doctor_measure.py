"""The verdict rules of `doctor --script`, on hand-made traces (no script is run: milliseconds)."""
from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from steadyclip.doctor.script import ScriptRun, _timing
from steadyclip.doctor.script_causes import EFFECT_TOL, build_causes, gather, measure
from steadyclip.doctor.script_trace import (
    Call,
    ModelRecord,
    RunTrace,
    Where,
    output_change,
)

HERE = Where("/u/script.py", 7, "model = open_clip.create_model('X')")


def call(seq: int, kind: str, out: np.ndarray, texts: tuple[str, ...] | None = None, *, training: bool = False,
         ) -> Call:
    return Call(seq=seq, model=0, kind=kind, where=HERE, training=training, layers=(), layer_count=0, autocast={},
                flags={}, weights="w", device="cpu", digests=(str(hash(out.tobytes())),), outputs=(out,),
                logit_scale=100.0, logit_bias=None, transforms_used={}, texts=texts,
                finite=(bool(np.isfinite(out).all()),))


def trace(*calls: Call, warnings: tuple[str, ...] = ()) -> RunTrace:
    model = ModelRecord(0, "create_model", "X", "tag", HERE, ({"path": "/w.safetensors"},), warnings=warnings)
    return RunTrace((), 0, "", "", 1.0, {0: model}, calls, {})


RNG = np.random.default_rng(0)
IMG = RNG.standard_normal((2, 8)).astype(np.float32)
CLASSES = [RNG.standard_normal((3, 8)).astype(np.float32) for _ in range(3)]


def per_class_run(img: np.ndarray, training: bool = False) -> RunTrace:
    texts = [call(i + 1, "encode_text", t, (f"a photo of class {i}", "b", "c"), training=training)
             for i, t in enumerate(CLASSES)]
    return trace(*texts, call(4, "encode_image", img, training=training))


def test_per_class_text_calls_are_one_class_each() -> None:
    run = per_class_run(IMG)
    probs = run.probabilities()
    assert probs is not None and probs.shape == (2, 3)  # not the last call's templates, not a 1x1 [[1.0]]
    assert run.labels() == ("a photo of class 0", "a photo of class 1", "a photo of class 2")


def test_a_fix_that_moves_features_below_the_tolerance_is_advice() -> None:
    as_is = [per_class_run(IMG, training=True)] * 2
    fixed = [per_class_run(IMG + np.float32(1e-6))]
    m = measure("eval", as_is, fixed)
    assert not m.needed and m.output_change is not None and 0 < m.output_change < EFFECT_TOL
    causes, advice = build_causes(as_is[0], gather(as_is), [m], fixed)
    assert causes == [] and [a.id for a in advice] == ["train_mode"]
    assert advice[0].summary.startswith("advice:")


def test_a_fix_that_moves_features_is_a_cause_even_when_runs_agree() -> None:
    as_is = [per_class_run(IMG, training=True)] * 2
    fixed = [per_class_run(IMG * np.array([1, -1] * 4, dtype=np.float32))]
    m = measure("eval", as_is, fixed)
    assert m.needed and not m.runs_disagree and m.output_change is not None and m.output_change > 0.1
    causes, advice = build_causes(as_is[0], gather(as_is), [m], fixed)
    assert [c.id for c in causes] == ["train_mode"] and advice == []
    assert "results are wrong" in causes[0].summary


def test_nan_against_a_number_is_an_infinite_change_and_nan_outputs_are_a_cause() -> None:
    nan = IMG.copy()
    nan[0, 0] = np.nan
    assert output_change(per_class_run(nan), per_class_run(IMG)) == math.inf
    runs = [per_class_run(nan)] * 2
    causes, _ = build_causes(runs[0], gather(runs), [], runs)
    assert [c.id for c in causes] == ["non_finite"]


def test_a_mismatch_open_clip_warns_about_is_a_cause_without_intervention() -> None:
    run = trace(call(1, "encode_image", IMG), warnings=("UserWarning: Some config mismatch between A and B",))
    causes, _ = build_causes(run, gather([run, run]), [], [run])
    assert [c.id for c in causes] == ["config_mismatch"] and "config mismatch between A and B" in causes[0].summary


def test_over_budget_says_why() -> None:
    runs = [ScriptRun(i, (), 0, 10.0, "", "") for i in range(2)]
    runs += [replace(runs[0], index=2, fixes=("pin_weights",), seconds=30.0)]
    t = _timing(runs, 2, 60.0)
    assert not t["within_budget"]
    assert any("pin_weights" in why for why in t["over_budget_because"])
    assert _timing(runs, 2, 33.0)["within_budget"]  # 3 processes x 10 s x 1.15
