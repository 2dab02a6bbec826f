"""Checks 1 and 3: train mode, the stochastic layers it switches on, and buffers a forward overwrote."""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from steadyclip.doctor.context import Context
from steadyclip.doctor.harness import max_abs_diff, probs_of, spread, top1, top1_changes
from steadyclip.doctor.result import PROB_TOL, Cause, Findings, Level

_logger = logging.getLogger(__name__)

__all__ = ["Layer", "check_buffers_mutated", "check_train_mode", "find_stochastic_layers", "training_modules"]

_LIST = 20  # module paths listed in evidence; the count says how many there are

FIX_EVAL = """\
model.eval()                      # once, right after creating/loading the model, before any forward
with torch.no_grad():             # inference needs no autograd either
    image_features = model.encode_image(images)
    text_features = model.encode_text(texts)
# or let steadyclip load it verified, in eval mode, locked there:
#   engine = steadyclip.Engine(steadyclip.load(MODEL, pretrained=...))"""

FIX_BUFFERS = """\
# the running statistics in this process are already overwritten: reload the weights, then eval()
model.load_state_dict(safetensors.torch.load_file(WEIGHTS))   # or create the model again
model.eval()                      # BatchNorm then uses (and never updates) its running statistics
with torch.no_grad():
    ...
# steadyclip.load() checks the buffers before every forward and refuses mutated weights"""


@dataclass(frozen=True)
class Layer:
    """A layer whose output depends on chance or on the rest of the batch."""

    path: str
    type: str
    kind: str  # dropout | drop_path | patch_dropout | attention_dropout | batch_statistics
    p: float | None
    active: bool

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "type": self.type, "kind": self.kind, "p": self.p}


def _prob(m: torch.nn.Module, *names: str) -> float:
    for n in names:
        v = getattr(m, n, None)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
    return 0.0


def find_stochastic_layers(model: torch.nn.Module) -> list[Layer]:
    """Dropout (p > 0), DropPath / stochastic depth, PatchDropout, attention dropout and BatchNorm.

    ``active`` says whether the layer behaves randomly or batch-dependently *now*:
    in train mode, or for BatchNorm without running statistics, always.
    """
    out: list[Layer] = []
    for name, m in model.named_modules():
        t = type(m).__name__
        path = name or "<root>"
        if isinstance(m, torch.nn.modules.dropout._DropoutNd):
            if m.p > 0:
                out.append(Layer(path, t, "dropout", float(m.p), m.training))
        elif "DropPath" in t or "StochasticDepth" in t or t == "DropBlock2d":
            p = _prob(m, "drop_prob", "p")
            if p > 0:
                out.append(Layer(path, t, "drop_path", p, m.training))
        elif t == "PatchDropout":
            p = _prob(m, "prob")
            if p > 0:
                out.append(Layer(path, t, "patch_dropout", p, m.training))
        elif isinstance(m, torch.nn.MultiheadAttention):
            if m.dropout > 0:
                out.append(Layer(path, t, "attention_dropout", float(m.dropout), m.training))
        elif isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            batch_stats = m.training or not m.track_running_stats or m.running_mean is None
            out.append(Layer(path, t, "batch_statistics", None, batch_stats))
    return out


def batch_composition_effect(ctx: Context) -> float | None:
    """In the model's own (train) mode: how much an image's probabilities change when its batch-mates change.

    BatchNorm in train mode normalises with the statistics of the current batch, so
    the same image gets a different answer next to different images. Compares the
    full batch with the batch minus its last image (or, for one image, alone vs next
    to its mirror image). ``None`` if the forward fails (e.g. a batch of one).
    """
    px = ctx.inputs.pixels_user
    if px.shape[0] >= 2:
        other, rows = px[:-1], px.shape[0] - 1
    else:
        other, rows = torch.cat([px, torch.flip(px, dims=[-1])]), 1
    try:
        with ctx.strict():
            full = probs_of(ctx.fp32, px, ctx.inputs)
        with ctx.strict():
            alt = probs_of(ctx.fp32, other, ctx.inputs)
    except Exception as e:  # noqa: BLE001 - train-mode BatchNorm refuses some batch shapes: the user's model
        _logger.debug("batch-composition probe failed: %s", e)
        return None
    finally:
        ctx.restore_weights()
    return max_abs_diff(full[:rows], alt[:rows])


def training_modules(model: torch.nn.Module) -> list[str]:
    return [name or "<root>" for name, m in model.named_modules() if m.training]


def check_train_mode(
    findings: Findings,
    *,
    model: torch.nn.Module,
    layers: list[Layer],
    train_runs: list[np.ndarray],
    baseline: np.ndarray,
    error: str | None,
    labels: list[str],
    eval_spread: float,
    composition: float | None = None,
) -> None:
    """``train_mode`` (how far train-mode results are from eval) and ``stochastic_layers`` (run-to-run spread)."""
    training = training_modules(model)
    n_modules = sum(1 for _ in model.modules())
    active = [lay for lay in layers if lay.active]
    if not training:
        _in_eval_mode(findings, n_modules, active)
        return

    effect = max((max_abs_diff(r, baseline) for r in train_runs), default=0.0)
    run_spread = spread(train_runs)
    flips = top1_changes(baseline, train_runs)
    evidence: dict[str, Any] = {
        "modules_in_train_mode": len(training),
        "modules_total": n_modules,
        "paths": training[:_LIST],
        "runs": len(train_runs),
        "max_abs_prob_diff_vs_eval": effect,
        "images_with_top1_different_from_eval": flips,
        "top1_eval": [labels[i] for i in top1(baseline)],
        "top1_per_run": [[labels[i] for i in top1(r)] for r in train_runs],
    }
    if error is not None:
        evidence["forward_error"] = error
    if active:
        summary = (f"{len(training)} of {n_modules} modules are in train mode; {len(active)} layer(s) behave "
                   f"differently there; probabilities move by up to {effect:.3g} from eval")
        level: Level = "problem"
    elif error is not None:
        summary = f"the model is in train mode and its forward fails there: {error}"
        level = "problem"
    else:
        level = "problem" if effect > PROB_TOL else "info"
        summary = (f"{len(training)} of {n_modules} modules are in train mode, but no layer behaves differently "
                   f"there (measured {effect:.3g}); call model.eval() anyway" if level == "info" else
                   f"{len(training)} of {n_modules} modules are in train mode and it moves probabilities by "
                   f"{effect:.3g}")
    findings.add(Cause("train_mode", effect if train_runs else None, level, summary, evidence, FIX_EVAL))

    if not active:
        findings.ok("stochastic_layers", "no Dropout/DropPath/PatchDropout/BatchNorm layer is active")
        return
    _stochastic_layers(findings, active, train_runs, run_spread, eval_spread, composition)


def _in_eval_mode(findings: Findings, n_modules: int, active: list[Layer]) -> None:
    findings.ok("train_mode", f"all {n_modules} modules are in eval mode")
    always = [lay for lay in active if lay.kind == "batch_statistics"]
    if not always:
        findings.ok("stochastic_layers", "no layer behaves randomly or batch-dependently in eval mode")
        return
    findings.add(Cause(
        "stochastic_layers", None, "problem",
        f"{len(always)} BatchNorm layer(s) have no running statistics and use batch statistics even "
        "in eval mode: results depend on the other images in the batch",
        {"layers": [lay.to_dict() for lay in always[:_LIST]], "count": len(always)},
        "# give these layers running statistics (track_running_stats=True) and load them, or run every "
        "image at the same fixed batch composition",
    ))


def _stochastic_layers(findings: Findings, active: list[Layer], train_runs: list[np.ndarray], run_spread: float,
                       eval_spread: float, composition: float | None) -> None:
    """``stochastic_layers`` in train mode: how far the active random/batch-dependent layers move results."""
    kinds = Counter(lay.kind for lay in active)
    sev = max(run_spread, composition or 0.0)
    summary = (f"{len(active)} random or batch-dependent layer(s) are active in train mode "
               f"({', '.join(f'{n} {k}' for k, n in sorted(kinds.items()))}); probabilities spread by "
               f"{run_spread:.3g} over {len(train_runs)} runs")
    if composition is not None:
        summary += f" and move by {composition:.3g} when the other images in the batch change"
    findings.add(Cause(
        "stochastic_layers", sev, "problem", summary,
        {
            "count_by_kind": dict(sorted(kinds.items())),
            "layers": [lay.to_dict() for lay in active[:_LIST]],
            "count": len(active),
            "runs": len(train_runs),
            "spread_train_mode": run_spread,
            "spread_eval": eval_spread,
            "batch_composition_effect": composition,
            "images_with_top1_changing_between_runs": top1_changes(train_runs[0], train_runs[1:]) if train_runs else 0,
        },
        FIX_EVAL.replace("# once, right after creating/loading the model, before any forward",
                         f"# switches off all {len(active)} of them; once, before any forward"),
    ))


def check_buffers_mutated(
    findings: Findings,
    *,
    changed: dict[str, float],
    effect: float | None,
    runs: int,
    batchnorm_training: list[str],
) -> None:
    """``buffers_mutated``: running the model as-is changed its weights or statistics."""
    if not changed:
        findings.ok("buffers_mutated", f"{runs} as-is forward(s) left every parameter and buffer bitwise unchanged")
        return
    # counters (num_batches_tracked) change by whole numbers; list the statistics and weights first
    top = sorted(changed.items(), key=lambda kv: (kv[0].endswith("num_batches_tracked"), -kv[1]))
    names = [n for n, _ in top]
    stats = [n for n in names if n.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    summary = (f"{runs} forward(s) as your code runs them changed {len(changed)} tensor(s)"
               + (f" ({len(stats)} BatchNorm running statistics)" if stats else "")
               + (f"; in eval mode that moves probabilities by {effect:.3g}" if effect is not None else ""))
    findings.add(Cause(
        "buffers_mutated", effect, "problem", summary,
        {
            "changed_tensors": len(changed),
            "names": names[:_LIST],
            "max_abs_change": {n: v for n, v in top[:10]},
            "after_runs": runs,
            "max_abs_prob_diff_in_eval": effect,
            "batchnorm_in_train_mode": batchnorm_training[:_LIST],
        },
        FIX_BUFFERS,
    ))
