"""From what the observer saw in the user's script to candidate fixes, and from measured fixes to causes.

The cause ids, fixes and result types are ``diagnose``'s own; only the
locations differ: every cause points at the line of the user's file that
created the model or made the call.

The rule: a fix is a *cause* only when, without it, the runs disagree or the
outputs the script produced (every call's features, and the probabilities when
the doctor can rebuild them) move by more than ``EFFECT_TOL``. A fix that moves
nothing is *advice*. Some results are wrong without any intervention: random
weights and NaN/Inf outputs are causes even when every run agrees.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from steadyclip.doctor import (
    checks_mode,
    checks_numerics,
    checks_preprocess,
    checks_weights,
)
from steadyclip.doctor.result import NUMERIC_TOL, Cause
from steadyclip.doctor.script_trace import (
    Call,
    Measured,
    RunTrace,
    Where,
    change_between,
    first_divergence,
)
from steadyclip.doctor.script_weights import (
    config_mismatch,
    located,
    model_where,
    non_finite,
    random_init,
)

__all__ = ["EFFECT_TOL", "Evidence", "Measured", "build_causes", "candidates", "gather", "measure"]

# Below this, a fix only changed which kernels ran (eval's attention fast path, a batch shape): ~1e-7..1e-5
# on CPU (DESIGN.md). Above it the change shows in the 4th decimal people print: the results were wrong.
EFFECT_TOL = NUMERIC_TOL

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
    nonfinite_calls: tuple[Call, ...] = ()
    mismatched_models: tuple[int, ...] = ()  # built otherwise than their pretrained tag expects (open_clip said)
    fixable_configs: tuple[int, ...] = ()  # ... and the observer can rebuild them as the tag expects


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
        nonfinite_calls=tuple(c for c in first.calls if not all(c.finite)),
        mismatched_models=tuple(k for k, m in first.models.items() if (m.quick_gelu and m.quick_gelu["mismatch"])
                                or any("mismatch" in w.lower() for w in m.warnings)),
        fixable_configs=tuple(k for k, m in first.models.items() if m.quick_gelu and m.quick_gelu["mismatch"]),
    )


def candidates(ev: Evidence) -> list[str]:
    """The interventions worth trying, in the order of the observer's ``FIXES`` (root causes first)."""
    out = []
    if ev.fixable_configs:
        out.append("config")
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


def measure(fix: str, without: Sequence[RunTrace], fixed: Sequence[RunTrace]) -> Measured:
    """Is ``fix`` needed: without it the runs disagree, or the outputs move by more than ``EFFECT_TOL``."""
    disagree = len({r.signature for r in without}) > 1
    out, prob = change_between(without[:1], fixed[:1])
    spread = max((x for x in change_between(without[:1], without[1:]) if x is not None), default=0.0) \
        if disagree else 0.0
    moved = max((x for x in (out, prob) if x is not None), default=None)
    needed = disagree or (moved is not None and moved > EFFECT_TOL)
    sev = max((x for x in (moved, spread) if x is not None), default=None)
    return Measured(fix, needed, sev, spread, len(without), out, prob, disagree)


def build_causes(first: RunTrace, ev: Evidence, measured: Sequence[Measured],
                 fixed_runs: Sequence[RunTrace]) -> tuple[list[Cause], list[Cause]]:
    """(causes, advice): each measured fix is one or the other; results wrong by themselves are causes."""
    out: list[Cause] = []
    by_fix = {m.fix: m for m in measured}
    for k in ev.random_models:
        out.append(random_init(first, k, by_fix.get("pin_weights")))
    if ev.nonfinite_calls:
        out.append(non_finite(first, ev.nonfinite_calls))
    for k in ev.mismatched_models:
        out.append(config_mismatch(first, k, by_fix.get("config")))
    pin = by_fix.get("pin_weights")
    if pin is not None and [k for k in ev.weights_differ if k not in ev.random_models]:
        out.append(_cause("weights_changed", pin, "the weights differ between runs of your script at the first "
                          "call", {"models": list(ev.weights_differ)}, checks_weights.FIX_WEIGHTS_CHANGED,
                          model_where(first, ev.weights_differ[0]), "the model whose weights change"))
    if "eval" in by_fix:
        out.append(_train_mode(first, ev, by_fix["eval"]))
    if "eval_transform" in by_fix:
        c = ev.random_transform_calls[0]
        ops = first.models[c.model].transforms.get("train", [])
        out.append(_cause(
            "preprocess_random", by_fix["eval_transform"],
            "your images go through open_clip's *training* transform (random crops): the pixels differ every run",
            {"train_transform": ops, "used_at": str(c.where), "calls": len(ev.random_transform_calls)},
            checks_preprocess.FIX_RANDOM, model_where(first, c.model),
            "this returns (model, preprocess_train, preprocess_eval): the train one is used"))
    if "no_autocast" in by_fix:
        c = ev.autocast_calls[0]
        out.append(_cause(
            "precision_drift", by_fix["no_autocast"],
            f"the model runs under autocast ({c.autocast}): lower precision moves the results away from float32",
            {"autocast": c.autocast, "calls_under_autocast": len(ev.autocast_calls), "first_at": str(c.where)},
            checks_numerics.FIX_PRECISION.replace("DEVICE", repr(c.device)), c.where, "called under autocast"))
    if "strict_flags" in by_fix:
        c = ev.risky_flag_calls[0]
        out.append(_cause("nondeterministic_flags", by_fix["strict_flags"],
                          "CUDA numerics flags allow TF32 / autotuned / non-deterministic kernels",
                          {"flags": c.flags, "first_at": str(c.where)}, checks_numerics.FIX_FLAGS, c.where,
                          "the first call with these flags"))
    if "seed" in by_fix:
        div = first_divergence([first, *fixed_runs[:1]])
        out.append(_cause("unseeded_randomness", by_fix["seed"],
                          "the outputs change until the random number generators are seeded: your script draws "
                          "random numbers the observer cannot attribute to a layer or transform",
                          {"first_divergence": div}, FIX_SEED, None, ""))
    return [c for c in out if c.level == "problem"], [c for c in out if c.level != "problem"]


def _cause(cid: str, m: Measured, summary: str, evidence: dict[str, Any], fix: str, where: Where | None,
           note: str) -> Cause:
    """A cause when the fix was needed (why: the runs disagree, or the outputs were wrong); else advice."""
    if m.needed and m.runs_disagree:
        summary += f"; without the fix the runs disagree (by up to {_fmt(m.spread_without)})"
    elif m.needed:
        summary += (f"; the runs agree, but the results are wrong: the fix moves your outputs by up to "
                    f"{_fmt(m.severity)}")
    else:
        summary = (f"advice: {summary}; fixing it changed none of your outputs by more than {EFFECT_TOL:g} here "
                   f"(measured {_fmt(m.severity)}), so it is not why your results differ")
    ev = {"at": str(where) if where else None, **evidence, "runs_disagree_without_fix": m.runs_disagree,
          "output_change": m.output_change, "probability_change": m.prob_change,
          "spread_without_this_fix": m.spread_without, "effect_of_fix": m.severity}
    return Cause(cid, m.severity, "problem" if m.needed else "info", summary, ev, located(fix, where, note))


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3g}"


def _train_mode(first: RunTrace, ev: Evidence, m: Measured) -> Cause:
    """One cause for everything ``model.eval()`` removes: dropout, DropPath, batch statistics, mutated buffers."""
    c = ev.training_calls[0]
    where = model_where(first, c.model) or c.where
    layers = [lay for call in ev.training_calls for lay in call.layers]
    kinds = sorted({lay["kind"] for lay in layers})
    summary = (f"{len(ev.training_calls)} call(s) ran the model in train mode (first: {c.site}); open_clip returns "
               "models in train mode")
    if kinds:
        summary += f", with {c.layer_count} random or batch-dependent layer(s) active ({', '.join(kinds)})"
    fix = checks_mode.FIX_EVAL
    if ev.buffers_changed:
        summary += "; its forwards overwrote the BatchNorm statistics between calls"
        fix = checks_mode.FIX_EVAL + "\n" + checks_mode.FIX_BUFFERS
    evidence = {"calls_in_train_mode": len(ev.training_calls), "first_call": str(c.where), "layer_kinds": kinds,
                "layers": layers[:20], "layer_count": c.layer_count, "buffers_mutated": list(ev.buffers_changed)}
    return _cause("train_mode", m, summary, evidence, fix, where, "model created here; call model.eval() after it")
