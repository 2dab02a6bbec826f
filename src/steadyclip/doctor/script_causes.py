"""From what the observer saw in the user's script to candidate fixes, and from measured fixes to causes.

The cause ids, fixes and result types are ``diagnose``'s own; only the
locations differ: every cause points at the line of the user's file that
created the model or made the call.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from steadyclip.doctor import (
    checks_mode,
    checks_numerics,
    checks_preprocess,
    checks_weights,
)
from steadyclip.doctor.result import Cause, Level
from steadyclip.doctor.script_trace import (
    Call,
    RunTrace,
    Where,
    first_divergence,
    prob_spread,
)

__all__ = ["Evidence", "build_causes", "candidates", "gather", "max_change"]

FIX_SEED = """\
# something else in your script draws random numbers before the model runs: seed them at the top
import random, numpy, torch
random.seed(0); numpy.random.seed(0); torch.manual_seed(0)"""

# checks_preprocess owns the names of random torchvision ops
_RANDOM_HINTS = checks_preprocess._RANDOM_HINTS


@dataclass(frozen=True)
class Evidence:
    """What the as-is runs showed, before any intervention."""

    random_models: tuple[int, ...]  # called with no weights loaded into them
    weights_differ: tuple[int, ...]  # weights digest at the first call differs between runs
    training_calls: tuple[Call, ...]
    buffers_changed: tuple[int, ...]  # weights digest changed between calls within one run
    random_transform_calls: tuple[Call, ...]
    autocast_calls: tuple[Call, ...]
    risky_flag_calls: tuple[Call, ...]
    stable: bool


def _is_random(ops: Sequence[str]) -> bool:
    return any(h in op for op in ops for h in _RANDOM_HINTS)


def gather(runs: Sequence[RunTrace]) -> Evidence:
    first = runs[0]
    called = sorted({c.model for c in first.calls})
    random_models = tuple(k for k in called if k in first.models and not first.models[k].weights_loaded)

    def first_weights(r: RunTrace, k: int) -> str | None:
        return next((c.weights for c in r.calls if c.model == k), None)

    differ = tuple(k for k in called if len({first_weights(r, k) for r in runs}) > 1)
    changed = tuple(k for k in called if len({c.weights for c in first.calls if c.model == k}) > 1)
    random_tf = []
    for c in first.calls:
        tfs = first.models[c.model].transforms if c.model in first.models else {}
        if any(n and _is_random(tfs.get(role, [])) for role, n in c.transforms_used.items()):
            random_tf.append(c)
    risky = [c for c in first.calls if c.device == "cuda" and (
        c.flags.get("cuda_matmul_allow_tf32") or c.flags.get("cudnn_allow_tf32") or c.flags.get("cudnn_benchmark")
        or not c.flags.get("deterministic_algorithms"))]
    return Evidence(
        random_models=random_models, weights_differ=differ,
        training_calls=tuple(c for c in first.calls if c.training), buffers_changed=changed,
        random_transform_calls=tuple(random_tf),
        autocast_calls=tuple(c for c in first.calls if any(v for v in c.autocast.values())),
        risky_flag_calls=tuple(risky), stable=len({r.signature for r in runs}) == 1,
    )


def candidates(ev: Evidence) -> list[str]:
    """The interventions worth trying, in the order of the observer's ``FIXES`` (root causes first)."""
    out = []
    if ev.weights_differ:
        out.append("pin_weights")
    if ev.training_calls:
        out.append("eval")
    if ev.random_transform_calls:
        out.append("eval_transform")
    if ev.autocast_calls:
        out.append("no_autocast")
    if ev.risky_flag_calls:
        out.append("strict_flags")
    return out


def max_change(a: Sequence[RunTrace], b: Sequence[RunTrace]) -> float | None:
    """How far the probabilities of one configuration are from another's (run by run, then the largest)."""
    pa, pb = [r.probabilities() for r in a], [r.probabilities() for r in b]
    best = 0.0
    for x in pa:
        for y in pb:
            if x is None or y is None:
                return None
            if x.shape != y.shape:
                return 1.0
            best = max(best, float(np.abs(x - y).max()))
    return best


def _located(fix: str, where: Where | None, note: str) -> str:
    if where is None or where.file is None:
        return fix
    return f"# {where}: {note}\n#   {where.code}\n{fix}"


@dataclass(frozen=True)
class Measured:
    """One kept intervention: the runs without it (everything else fixed) against the runs with all fixes."""

    fix: str
    needed: bool
    severity: float | None
    spread_without: float | None
    runs_without: int


def build_causes(first: RunTrace, ev: Evidence, measured: Sequence[Measured],
                 fixed_runs: Sequence[RunTrace]) -> list[Cause]:
    causes: list[Cause] = []
    by_fix = {m.fix: m for m in measured}
    for k in ev.random_models:
        causes.append(_random_init(first, k, by_fix.get("pin_weights")))
    pin = by_fix.get("pin_weights")
    if pin is not None and [k for k in ev.weights_differ if k not in ev.random_models]:
        causes.append(_cause("weights_changed", pin, "the weights differ between runs of your script at the first "
                             "call", {"models": list(ev.weights_differ)}, checks_weights.FIX_WEIGHTS_CHANGED,
                             _model_where(first, ev.weights_differ[0]), "the model whose weights change"))
    if "eval" in by_fix:
        causes.extend(_train_mode(first, ev, by_fix["eval"]))
    if "eval_transform" in by_fix:
        c = ev.random_transform_calls[0]
        ops = first.models[c.model].transforms.get("train", [])
        causes.append(_cause(
            "preprocess_random", by_fix["eval_transform"],
            "your images go through open_clip's *training* transform (random crops): the pixels differ every run",
            {"train_transform": ops, "used_at": str(c.where), "calls": len(ev.random_transform_calls)},
            checks_preprocess.FIX_RANDOM, _model_where(first, c.model),
            "this returns (model, preprocess_train, preprocess_eval): the train one is used"))
    if "no_autocast" in by_fix:
        c = ev.autocast_calls[0]
        causes.append(_cause(
            "precision_drift", by_fix["no_autocast"],
            f"the model runs under autocast ({c.autocast}): lower precision moves the results away from float32",
            {"autocast": c.autocast, "calls_under_autocast": len(ev.autocast_calls), "first_at": str(c.where)},
            checks_numerics.FIX_PRECISION.replace("DEVICE", repr(c.device)), c.where, "called under autocast"))
    if "strict_flags" in by_fix:
        c = ev.risky_flag_calls[0]
        causes.append(_cause("nondeterministic_flags", by_fix["strict_flags"],
                             "CUDA numerics flags allow TF32 / autotuned / non-deterministic kernels",
                             {"flags": c.flags, "first_at": str(c.where)}, checks_numerics.FIX_FLAGS, c.where,
                             "the first call with these flags"))
    if "seed" in by_fix:
        div = first_divergence([first, *fixed_runs[:1]])
        causes.append(_cause("unseeded_randomness", by_fix["seed"],
                             "the outputs change until the random number generators are seeded: your script draws "
                             "random numbers the observer cannot attribute to a layer or transform",
                             {"first_divergence": div}, FIX_SEED, None, ""))
    return causes


def _cause(cid: str, m: Measured, summary: str, evidence: dict[str, Any], fix: str, where: Where | None,
           note: str) -> Cause:
    level: Level = "problem" if m.needed else "info"
    if m.needed:
        summary += f"; fixing it moves probabilities by up to {_fmt(m.severity)}"
    else:
        summary += "; removing it changed no output here"
    ev = {"at": str(where) if where else None, **evidence, "spread_without_this_fix": m.spread_without,
          "effect_of_fix": m.severity}
    return Cause(cid, m.severity, level, summary, ev, _located(fix, where, note))


def _fmt(x: float | None) -> str:
    return "n/a (no probabilities)" if x is None else f"{x:.3g}"


def _model_where(first: RunTrace, k: int) -> Where | None:
    rec = first.models.get(k)
    return rec.where if rec is not None else None


def _random_init(first: RunTrace, k: int, pin: Measured | None) -> Cause:
    rec = first.models.get(k)
    where = rec.where if rec is not None else None
    arch = rec.arch if rec is not None else None
    pretrained = rec.pretrained if rec is not None else None
    summary = (f"{where}: model created here without pretrained weights ({arch!r}, pretrained={pretrained!r}) and "
               "no weights were loaded before it ran: its weights are random")
    summary += (", new ones in every process" if pin is not None and pin.needed else
                " (the runs agree, but the answers are still those of an untrained model)")
    evidence = {"at": str(where), "arch": arch, "pretrained": pretrained, "weights_loaded": False,
                "spread_without_pinning": pin.spread_without if pin else None}
    fix = checks_weights.FIX_RANDOM_INIT.replace("ARCH", repr(arch) if arch else "ARCH")
    return Cause("random_init", pin.severity if pin is not None else None, "problem", summary, evidence,
                 _located(fix, where, "model created here without pretrained weights"))


def _train_mode(first: RunTrace, ev: Evidence, m: Measured) -> list[Cause]:
    c = ev.training_calls[0]
    where = _model_where(first, c.model) or c.where
    layers = [lay for call in ev.training_calls for lay in call.layers]
    kinds = sorted({lay["kind"] for lay in layers})
    out = [_cause("train_mode", m, f"{len(ev.training_calls)} call(s) ran the model in train mode "
                  f"(first: {c.site}); open_clip returns models in train mode",
                  {"calls_in_train_mode": len(ev.training_calls), "first_call": str(c.where)},
                  checks_mode.FIX_EVAL, where, "model created here; call model.eval() after it")]
    if layers and m.needed:
        # batch statistics are not random: with fixed weights they move nothing run to run, only the answer
        out.append(Cause("stochastic_layers", m.spread_without or m.severity, "problem",
                         f"{c.layer_count} random or batch-dependent layer(s) active at {c.site} "
                         f"({', '.join(kinds)})",
                         {"layers": layers[:20], "count": c.layer_count, "at": str(c.where)},
                         _located(checks_mode.FIX_EVAL, where, "model created here; call model.eval() after it")))
    if ev.buffers_changed and m.needed:
        out.append(Cause("buffers_mutated", m.severity, "problem",
                         "train-mode forwards overwrote the model's BatchNorm statistics between calls",
                         {"models": list(ev.buffers_changed), "at": str(c.where)},
                         _located(checks_mode.FIX_BUFFERS, where, "model created here")))
    return out


def spread_of(runs: Sequence[RunTrace]) -> float | None:
    return prob_spread(runs) if len({r.signature for r in runs}) > 1 else 0.0
