"""Causes that make a script's results wrong whatever the runs show: random, non-finite or mismatched weights.

None of these needs the runs to disagree: a seeded random model, NaN outputs, or
a model built with GELU holding weights trained with QuickGELU give the same
wrong answer every run. Each fix names the user's line and works for how the
model was made (``hf-hub:`` names ignore ``pretrained=``, so their fix differs).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from steadyclip.doctor import checks_weights
from steadyclip.doctor.result import Cause, Level
from steadyclip.doctor.script_trace import Call, Measured, RunTrace, Where

__all__ = ["config_mismatch", "located", "model_where", "non_finite", "random_init"]

FIX_HUB_WEIGHTS = """\
# open_clip ignores pretrained= for 'hf-hub:' names: the weights are the repo's own file, and REPO has none
# in your cache (open_clip only logged a warning and built a random model). Either fetch the file once, online:
#   huggingface-cli download REPO FILE          (or run once without HF_HUB_OFFLINE=1)
# or load a weights file you have into the model you built:
model, _, preprocess = open_clip.create_model_and_transforms('hf-hub:REPO')
open_clip.load_checkpoint(model, '/path/to/open_clip_model.safetensors')   # strict: refuses partial weights
# then pin what you loaded:  steadyclip lock hf-hub:REPO -o steadyclip.lock"""

FIX_QUICKGELU = """\
# the pretrained tag TAG was trained with QuickGELU (quick_gelu=TAG_QG) but ARCH builds the model with
# quick_gelu=CFG_QG: every activation is slightly off, the same way every run - the answers are wrong, not random
model, _, preprocess = open_clip.create_model_and_transforms(FIXED_ARGS)"""

FIX_CONFIG = """\
# build the model exactly as its pretrained tag expects (open_clip's warning above names the setting); the
# tag's own config is in open_clip.get_pretrained_cfg(ARCH, TAG), the model's in open_clip.get_model_config(ARCH)
model, _, preprocess = open_clip.create_model_and_transforms(ARCH_AS_THE_TAG_EXPECTS, pretrained=TAG)"""

FIX_NAN_WEIGHTS = """\
# the weights file holds NaN/Inf: its bytes are damaged (it still parses, so nothing failed while loading).
# delete it and fetch it again, then pin its hash so a damaged copy is refused next time:
#   rm FILE
#   steadyclip lock ARCH --pretrained TAG_OR_FILE -o steadyclip.lock
model = steadyclip.load(ARCH, pretrained=TAG_OR_FILE, lock="steadyclip.lock")   # refuses non-finite weights"""


def located(fix: str, where: Where | None, note: str) -> str:
    if where is None or where.file is None:
        return fix
    return f"# {where}: {note}\n#   {where.code}\n{fix}"


def model_where(first: RunTrace, k: int) -> Where | None:
    rec = first.models.get(k)
    return rec.where if rec is not None else None


def _hub_repo(arch: Any) -> str | None:
    return arch[len("hf-hub:"):] if isinstance(arch, str) and arch.startswith("hf-hub:") else None


def random_init(first: RunTrace, k: int, pin: Measured | None) -> Cause:
    """Random weights are wrong even when the runs agree; the fix depends on how the model was named."""
    rec = first.models.get(k)
    where = rec.where if rec is not None else None
    arch = rec.arch if rec is not None else None
    pretrained = rec.pretrained if rec is not None else None
    repo = _hub_repo(arch)
    failed = [d for d in first.downloads if not d.get("ok") and not str(d.get("filename") or "").endswith(".json")]
    if repo is not None:
        summary = (f"{where}: model created here from {arch!r}, but the repo's weights file is not in your cache "
                   "(open_clip logged a warning and built it with random weights)")
        if pretrained:
            summary += f"; pretrained={pretrained!r} is ignored for hf-hub: names"
        file = next((str(d["filename"]) for d in failed if d.get("filename")), "open_clip_model.safetensors")
        fix = FIX_HUB_WEIGHTS.replace("REPO", repo).replace("FILE", file)
    else:
        summary = (f"{where}: model created here without pretrained weights ({arch!r}, pretrained={pretrained!r}) "
                   "and no weights were loaded before it ran: its weights are random")
        fix = checks_weights.FIX_RANDOM_INIT.replace("ARCH", repr(arch) if arch else "ARCH")
    summary += (", new ones in every process" if pin is not None and pin.needed else
                " (the runs may agree, but the answers are those of an untrained model)")
    evidence = {"at": str(where), "arch": arch, "pretrained": pretrained, "weights_loaded": False,
                "open_clip_warnings": list(rec.warnings) if rec is not None else [],
                "failed_downloads": [{k2: d.get(k2) for k2 in ("source", "filename", "error")} for d in failed],
                "spread_without_pinning": pin.spread_without if pin else None}
    return Cause("random_init", pin.severity if pin is not None else None, "problem", summary, evidence,
                 located(fix, where, "model created here without pretrained weights"))


def non_finite(first: RunTrace, calls: Sequence[Call]) -> Cause:
    """NaN/Inf outputs: wrong in every run; the weights say whether the file or the numerics are to blame."""
    c = calls[0]
    bad = next((x.nonfinite_weights for x in calls if x.nonfinite_weights and x.nonfinite_weights.get("count")),
               None)
    rec = first.models.get(c.model)
    loads = [ld for ld in (rec.loads if rec else ()) if ld.get("path")]
    where = rec.where if rec is not None and rec.where is not None else c.where
    evidence: dict[str, Any] = {"at": str(c.where), "calls_with_nan_or_inf": len(calls),
                                "calls_total": len(first.calls), "nonfinite_weights": bad,
                                "weights_files": [{k: ld.get(k) for k in ("path", "size", "sha256", "via")}
                                                  for ld in loads]}
    if bad:
        file = str(loads[-1]["path"]) if loads else "the weights file you loaded"
        summary = (f"{len(calls)} call(s) returned NaN/Inf (first: {c.site}): {bad['count']} of the model's "
                   f"{bad['tensors']} weight tensors hold NaN/Inf (first: {bad['names'][:1]}), loaded from {file}; "
                   "the file is damaged")
        arch, src = (rec.arch, rec.pretrained or file) if rec is not None else ("ARCH", file)
        fix = (FIX_NAN_WEIGHTS.replace("rm FILE", f"rm {file}").replace("load(ARCH", f"load({arch!r}")
               .replace("pretrained=TAG_OR_FILE", f"pretrained={src!r}").replace("TAG_OR_FILE", str(src))
               .replace("ARCH", str(arch)))
        note = "the weights loaded for this model are damaged"
    else:
        summary = (f"{len(calls)} call(s) returned NaN/Inf (first: {c.site}) though the weights are finite: "
                   "an overflow in the numerics (fp16?)")
        fix, note = checks_weights.FIX_NON_FINITE, "the model that returns NaN/Inf"
    return Cause("non_finite", None, "problem", summary, evidence, located(fix, where, note))


def config_mismatch(first: RunTrace, k: int, m: Measured | None) -> Cause:
    """A model built otherwise than its pretrained tag expects: consistently wrong, proven by rebuilding it."""
    rec = first.models[k]
    qg = rec.quick_gelu or {}
    warned = [w for w in rec.warnings if "mismatch" in w.lower()]
    if not qg.get("mismatch"):  # a mismatch open_clip warns about that the observer cannot rebuild away
        return Cause("config_mismatch", None, "problem",
                     f"{rec.where}: open_clip warned while building {rec.arch!r} with pretrained={rec.pretrained!r}: "
                     f"{warned[0] if warned else '?'}; a model built otherwise than its weights were trained is "
                     "wrong in every run", {"at": str(rec.where), "open_clip_warning": warned},
                     located(FIX_CONFIG, rec.where, "model created here"))
    alt = qg.get("model_name_fix")
    args = f"{alt!r}, pretrained={rec.pretrained!r}" if alt else \
        f"{rec.arch!r}, pretrained={rec.pretrained!r}, force_quick_gelu=True"
    fix = (FIX_QUICKGELU.replace("TAG_QG", str(qg.get("tag"))).replace("CFG_QG", str(qg.get("config")))
           .replace("TAG", repr(rec.pretrained)).replace("ARCH", repr(rec.arch)).replace("FIXED_ARGS", args))
    summary = (f"{rec.where}: {rec.arch!r} is built with quick_gelu={qg.get('config')}, but the pretrained tag "
               f"{rec.pretrained!r} was trained with quick_gelu={qg.get('tag')}")
    if m is not None and m.needed:
        summary += (f"; rebuilding it as {alt or 'force_quick_gelu=True'} moves your outputs by up to "
                    f"{_fmt(m.severity)}: the results are wrong in every run")
    elif m is not None:
        summary = (f"advice: {summary}; rebuilding it moved no output by more than the tolerance here "
                   f"(measured {_fmt(m.severity)})")
    evidence = {"at": str(rec.where), "quick_gelu": qg, "open_clip_warning": warned[:1],
                "output_change": m.output_change if m else None, "probability_change": m.prob_change if m else None,
                "effect_of_fix": m.severity if m else None}
    level: Level = "problem" if m is None or m.needed else "info"
    return Cause("config_mismatch", m.severity if m else None, level, summary, evidence,
                 located(fix, rec.where, "model created here with the wrong activation for its weights"))


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3g}"
