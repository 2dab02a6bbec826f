"""Checks 4-7: precision, device, batch composition, thread count and numerics flags.

All measured in eval mode without gradients, changing one thing against the
reference (fp32, strict flags, the caller's thread count, one batch).
"""
from __future__ import annotations

import copy
import logging
import os
from typing import Any

import numpy as np
import torch

from steadyclip.doctor.context import Context
from steadyclip.doctor.harness import (
    Encoded,
    amp_dtype,
    class_embeddings,
    encode,
    head,
    max_abs_diff,
    model_float_dtype,
    no_autocast,
    top1,
    top1_changes,
    top_margin,
)
from steadyclip.doctor.result import NUMERIC_TOL, PROB_TOL, Cause, Findings, Level
from steadyclip.doctor.state import eval_temporarily, strict_numerics
from steadyclip.engine import precision
from steadyclip.errors import DeviceError, NumericsError
from steadyclip.numerics import drift
from steadyclip.numerics.head import ZeroShotHead

_logger = logging.getLogger(__name__)

__all__ = ["check_batch", "check_device", "check_flags", "check_precision", "check_threads"]

FIX_PRECISION = """\
# run inference in float32 with autocast off (or accept the drift and always use the same precision)
model = model.float()
with torch.no_grad(), torch.autocast(DEVICE, enabled=False):
    image_features = model.encode_image(images)
# steadyclip's "strict" profile is fp32; "fast" casts the weights to bf16 once (on CPUs with native bf16)
# and records its measured drift from strict in every result's provenance"""

FIX_FLAGS = """\
# before the first forward (steadyclip's strict profile sets and restores these for you):
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
torch.backends.cudnn.benchmark = False          # autotuning may pick a different kernel each process
torch.use_deterministic_algorithms(True)
torch.set_float32_matmul_precision("highest")
# and in the environment, before Python starts:
#   export CUBLAS_WORKSPACE_CONFIG=:4096:8     # CUDA: deterministic cuBLAS
#   export MKL_CBWR=AUTO,STRICT                # CPU: batch/thread-invariant MKL GEMMs"""

FIX_BATCH = """\
# the row for an image depends on the batch *shape*: always run the same batch size (pad the tail)
engine = steadyclip.Engine(steadyclip.load(MODEL, pretrained=...), micro_batch=8)   # fixed shapes, padded
# on CPU also set MKL_CBWR=AUTO,STRICT before Python starts (steadyclip does this at import)"""

FIX_THREADS = """\
# use the same intra-op thread count on every run, set before the first forward
torch.set_num_threads(1)
# or: steadyclip classify --threads 1 ...  /  steadyclip.Engine(loaded, threads=1)"""

FIX_DEVICE = """\
# CPU and GPU kernels round differently: compare results only within one device type,
# and record it - steadyclip puts the device into every result's provenance"""


def _level(sev: float, tol: float) -> Level:
    return "problem" if sev > tol else "info"


def _risky_flags(flags: dict[str, Any], device_type: str) -> list[str]:
    """What in a :func:`steadyclip.numerics.determinism.current_flags` document lets results move, in words."""
    issues = []
    if flags["float32_matmul_precision"] != "highest":
        issues.append(f"float32_matmul_precision={flags['float32_matmul_precision']!r} allows reduced-precision "
                      "matmuls (TF32 on CUDA, bf16 via oneDNN on CPU)")
    lowered = {leaf: v for leaf, v in flags["fp32_precision"].items()
               if leaf.startswith("mkldnn.") and v not in (None, "none", "ieee")}
    if lowered:
        issues.append(f"oneDNN fp32_precision {lowered} lowers CPU matmul/conv precision")
    if device_type == "cuda":
        if flags["cuda_matmul_allow_tf32"]:
            issues.append("TF32 matmuls are on (torch.backends.cuda.matmul.allow_tf32)")
        if flags["cudnn_allow_tf32"]:
            issues.append("TF32 convolutions are on (torch.backends.cudnn.allow_tf32)")
        if flags["cudnn_benchmark"]:
            issues.append("cudnn.benchmark autotunes kernels: the choice can differ between processes")
        if not flags["deterministic_algorithms"]:
            issues.append("deterministic algorithms are off: some CUDA kernels use atomics")
        if not flags["env"]["CUBLAS_WORKSPACE_CONFIG"]:
            issues.append("CUBLAS_WORKSPACE_CONFIG is not set: cuBLAS may reduce in a varying order")
    else:
        asked, effective = flags["mkl_cbwr"] or "", flags["mkl_cbwr_effective"]
        if "STRICT" not in asked.upper():
            issues.append(f"MKL_CBWR={asked or None!r}: MKL GEMMs may differ by batch size and thread count")
        elif flags["mkl_cbwr_status"] == "too late":
            issues.append(f"MKL_CBWR={asked!r} was set after MKL's first GEMM (MKL reports {effective!r}); set it "
                          "before Python starts or import steadyclip before running any model")
    return issues


def check_precision(ctx: Context, findings: Findings) -> list[np.ndarray]:
    """``precision_drift``: autocast (bf16 on CPU, fp16 on CUDA) or half-precision weights vs fp32."""
    assert ctx.baseline is not None
    dev = ctx.device_type
    dtype = ctx.amp_in_use or amp_dtype(dev)
    # under the caller's own flags: reduced-precision kernels are what their process would run
    p_amp = ctx.ambient_probs(amp=dtype)
    d_amp = max_abs_diff(p_amp, ctx.baseline)
    evidence: dict[str, Any] = {
        "autocast_dtype": str(dtype).removeprefix("torch."),
        "autocast_in_use": ctx.amp_in_use is not None,
        "max_abs_prob_diff_autocast_vs_fp32": d_amp,
        "top1_agreement": 1.0 - top1_changes(ctx.baseline, [p_amp]) / max(1, ctx.baseline.shape[0]),
        "min_top1_top2_margin_fp32": top_margin(ctx.baseline),
    }
    evidence["steadyclip_fast"] = _fast_profile_drift(ctx)
    outputs = [p_amp]
    in_use = [d_amp] if ctx.amp_in_use is not None else []
    wdtype = model_float_dtype(ctx.model)
    evidence["weights_dtype"] = str(wdtype).removeprefix("torch.")
    if wdtype != torch.float32:
        p_half = ctx.ambient_probs(model=ctx.model)
        d_half = max_abs_diff(p_half, ctx.baseline)
        evidence["max_abs_prob_diff_weights_vs_fp32"] = d_half
        in_use.append(d_half)
        outputs.append(p_half)
    if not all(np.isfinite(p).all() for p in (ctx.baseline, *outputs)):  # max_abs_diff skips NaN: not "ok"
        findings.skipped("precision_drift", "probabilities are not finite (see non_finite), so reduced-precision "
                         "drift cannot be measured")
    elif in_use:
        sev = max(in_use)
        what = " and ".join(([f"autocast to {evidence['autocast_dtype']}"] if ctx.amp_in_use else [])
                            + ([f"{evidence['weights_dtype']} weights"] if wdtype != torch.float32 else []))
        findings.add(Cause("precision_drift", sev, _level(sev, PROB_TOL),
                           f"your code runs with {what}: probabilities differ from float32 by up to {sev:.3g}",
                           evidence, FIX_PRECISION.replace("DEVICE", repr(dev))))
    elif d_amp > 0:
        findings.add(Cause("precision_drift", d_amp, "info",
                           f"not in use; if you enabled {evidence['autocast_dtype']} autocast, probabilities would "
                           f"move by up to {d_amp:.3g}", evidence, FIX_PRECISION.replace("DEVICE", repr(dev))))
    else:
        findings.ok("precision_drift", "autocast gives bitwise the fp32 result here")
    return outputs


def _fast_profile_drift(ctx: Context) -> dict[str, Any]:
    """What steadyclip's ``fast`` profile (weights cast once) would do to these inputs: the engine's drift path."""
    assert ctx.baseline_enc is not None
    dev = ctx.device_type
    dtype = torch.bfloat16 if dev == "cpu" or torch.cuda.is_bf16_supported() else torch.float16
    twin = precision.cast_copy(ctx.fp32, dtype)
    try:
        enc = ctx.eval_encode(model=twin)
    finally:
        del twin
    base, t = ctx.baseline_enc, ctx.inputs.n_templates
    out: dict[str, Any] = {"dtype": str(dtype).removeprefix("torch.")}
    try:
        figures = drift.compare(base.images, class_embeddings(base.texts, t), enc.images,
                                class_embeddings(enc.texts, t), head=ZeroShotHead.from_model(ctx.fp32),
                                reference="your model in fp32, strict flags", inputs="your images/labels")
    except NumericsError as e:  # NaN/Inf embeddings: the engine would refuse them; non_finite reports the cause
        out["error"] = f"NumericsError: {e}"
    else:
        out |= figures.to_dict()
    if dev == "cpu":
        out["native_bf16"] = precision.cpu_bf16_support().native
    return out


def check_flags(ctx: Context, findings: Findings) -> None:
    """``nondeterministic_flags``: the caller's numerics flags vs steadyclip's strict ones, measured."""
    assert ctx.baseline is not None
    flags = ctx.ambient_flags
    issues = _risky_flags(flags, ctx.device_type)
    p_ambient = ctx.ambient_probs()
    sev = max_abs_diff(p_ambient, ctx.baseline)
    evidence = {"flags": flags, "issues": issues, "max_abs_prob_diff_your_flags_vs_strict": sev}
    if not issues and sev == 0.0:
        findings.ok("nondeterministic_flags", "numerics flags are deterministic (results equal the strict profile's)")
        return
    level = _level(sev, NUMERIC_TOL)
    summary = (f"{len(issues)} numerics flag(s) allow run-to-run or cross-machine differences"
               if issues else "your numerics flags differ from steadyclip's strict profile")
    findings.add(Cause("nondeterministic_flags", sev, level, f"{summary}; measured effect here {sev:.3g}",
                       evidence, FIX_FLAGS))


def check_batch(ctx: Context, findings: Findings) -> None:
    """``batch_variance``: the same images at batch size N vs 1 vs reversed order; texts all at once vs singly.

    Measured under the caller's own flags: that is where their batch size matters.
    """
    base = ctx.ambient_encode()
    p_base = head(ctx.fp32, base, ctx.inputs.n_templates)
    n = ctx.inputs.pixels_user.shape[0]
    p_count = ctx.inputs.tokens.shape[0]
    evidence: dict[str, Any] = {"images": n, "prompts": p_count, "flags": "yours"}
    emb: list[float] = []
    probs: list[np.ndarray] = []
    if n >= 2:
        single = ctx.ambient_encode(image_chunk=1)
        rev = ctx.ambient_encode(order=list(reversed(range(n))))
        emb += [max_abs_diff(single.images, base.images), max_abs_diff(rev.images, base.images)]
        evidence["image_emb_max_abs_diff_batch1_vs_batchN"] = emb[0]
        evidence["image_emb_max_abs_diff_reversed_order"] = emb[1]
        evidence["batch_sizes"] = [n, 1]
        probs += [head(ctx.fp32, single, ctx.inputs.n_templates), head(ctx.fp32, rev, ctx.inputs.n_templates)]
    else:  # one image: compare it alone with it in a batch of four copies
        four = ctx.ambient_encode(pixels=ctx.inputs.pixels_user.repeat(4, 1, 1, 1))
        emb.append(max_abs_diff(four.images[:1], base.images))
        evidence["image_emb_max_abs_diff_batch1_vs_batch4"] = emb[-1]
        evidence["batch_sizes"] = [1, 4]
        probs.append(head(ctx.fp32, Encoded(four.images[:1], base.texts), ctx.inputs.n_templates))
    chunk = 1 if p_count <= 64 else 7
    texts = ctx.ambient_encode(pixels=ctx.inputs.pixels_user[:1], text_chunk=chunk)
    emb.append(max_abs_diff(texts.texts, base.texts))
    evidence[f"text_emb_max_abs_diff_all_vs_chunks_of_{chunk}"] = emb[-1]
    probs.append(head(ctx.fp32, Encoded(base.images, texts.texts), ctx.inputs.n_templates))
    sev = max(max_abs_diff(p, p_base) for p in probs)
    evidence["max_abs_prob_diff"] = sev
    evidence["images_with_top1_change"] = top1_changes(p_base, probs)
    if sev == 0.0 and not any(emb):
        findings.ok("batch_variance", "bitwise identical across batch sizes and positions")
        return
    findings.add(Cause("batch_variance", sev, _level(sev, NUMERIC_TOL),
                       "the same input gives slightly different results at another batch size or position "
                       f"(probabilities up to {sev:.3g})", evidence, FIX_BATCH))


def check_threads(ctx: Context, findings: Findings) -> None:
    """``thread_variance``: the caller's thread count vs another (1, or 2 when already at 1), under their flags."""
    if ctx.device_type != "cpu":
        findings.skipped("thread_variance", f"the model runs on {ctx.device_type}; CPU threads do not apply")
        return
    cpus = os.cpu_count() or 1
    other = 1 if ctx.threads > 1 else (2 if cpus >= 2 else None)
    if other is None:
        findings.skipped("thread_variance", "only one CPU: no other thread count to compare")
        return
    base = ctx.ambient_encode(threads=ctx.threads)
    enc = ctx.ambient_encode(threads=other)
    p_base, p = head(ctx.fp32, base, ctx.inputs.n_templates), head(ctx.fp32, enc, ctx.inputs.n_templates)
    sev = max_abs_diff(p, p_base)
    evidence = {
        "threads": [ctx.threads, other],
        "flags": "yours",
        "image_emb_max_abs_diff": max_abs_diff(enc.images, base.images),
        "text_emb_max_abs_diff": max_abs_diff(enc.texts, base.texts),
        "max_abs_prob_diff": sev,
        "images_with_top1_change": top1_changes(p_base, [p]),
    }
    if sev == 0.0 and evidence["image_emb_max_abs_diff"] == 0.0 and evidence["text_emb_max_abs_diff"] == 0.0:
        findings.ok("thread_variance", f"bitwise identical at {ctx.threads} and {other} threads")
        return
    findings.add(Cause("thread_variance", sev, _level(sev, NUMERIC_TOL),
                       f"{ctx.threads} vs {other} threads changes probabilities by up to {sev:.3g}",
                       evidence, FIX_THREADS))


def check_device(ctx: Context, findings: Findings) -> None:
    """``device_drift``: CPU vs CUDA, when CUDA exists."""
    assert ctx.baseline is not None
    if not torch.cuda.is_available():
        findings.skipped("device_drift", "CUDA is not available on this machine; nothing to compare the CPU with")
        return
    other = "cpu" if ctx.device_type == "cuda" else "cuda"
    try:
        twin = copy.deepcopy(ctx.fp32).to(other)
        with eval_temporarily(twin), strict_numerics(other, ctx.threads), no_autocast(other):
            p = head(twin, encode(twin, ctx.inputs.pixels_user, ctx.inputs.tokens), ctx.inputs.n_templates)
        del twin
    except (DeviceError, RuntimeError) as e:  # out of memory, CUDA set up without deterministic cuBLAS, ...
        findings.skipped("device_drift", f"could not run the model on {other}: {type(e).__name__}: {e}")
        return
    sev = max_abs_diff(p, ctx.baseline)
    evidence = {"devices": [ctx.device_type, other], "max_abs_prob_diff": sev,
                "images_with_top1_change": top1_changes(ctx.baseline, [p]),
                "top1": {ctx.device_type: top1(ctx.baseline), other: top1(p)}}
    if sev == 0.0:
        findings.ok("device_drift", f"{ctx.device_type} and {other} agree bitwise")
        return
    findings.add(Cause("device_drift", sev, _level(sev, NUMERIC_TOL),
                       f"{ctx.device_type} vs {other}: probabilities differ by up to {sev:.3g}", evidence, FIX_DEVICE))
