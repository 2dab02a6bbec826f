"""Check 9: is the image preprocessing the one the model was trained with, and is it deterministic?

The user's transform (usually a torchvision ``Compose``) is read step by step
into the same terms as open_clip's ``PreprocessCfg`` (size, resize mode,
interpolation, mean, std) and compared field by field; then both transforms are
run on the actual images and the model, so the effect is measured, not assumed.
"""
from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from steadyclip.doctor.context import Context
from steadyclip.doctor.harness import (
    max_abs_diff,
    preprocess_cfg_of,
    spread,
    stack_pixels,
)
from steadyclip.doctor.result import PROB_TOL, Cause, Findings

_logger = logging.getLogger(__name__)

__all__ = ["check_preprocess", "compare_to_cfg", "describe_transform", "random_pixels"]

FIX_MISMATCH = """\
# use the model's own eval transform (the third value create_model_and_transforms returns):
model, _, preprocess = open_clip.create_model_and_transforms(ARCH, pretrained=TAG)
# or rebuild it from the model:
from open_clip.transform import PreprocessCfg, image_transform_v2
preprocess = image_transform_v2(PreprocessCfg(**model.visual.preprocess_cfg), is_train=False)"""

FIX_RANDOM = """\
# this is a training transform (random crops/flips/jitter): use the eval one for inference
model, preprocess_train, preprocess = open_clip.create_model_and_transforms(ARCH, pretrained=TAG)
image = preprocess(pil_image)      # NOT preprocess_train"""

_RANDOM_HINTS = ("Random", "ColorJitter", "AutoAugment", "RandAugment", "TrivialAugment", "AugMix", "color_jitter",
                 "gray_scale")


def _interp_name(v: object) -> str:
    name = getattr(v, "value", v)
    return str(name).lower()


def _size2(v: object) -> list[int] | None:
    if isinstance(v, int):
        return [v, v]
    if isinstance(v, (list, tuple)) and v:
        return [int(v[0]), int(v[-1])] if len(v) >= 2 else [int(v[0]), int(v[0])]
    return None


def describe_transform(transform: object) -> dict[str, Any] | None:
    """Read a torchvision/open_clip ``Compose`` into size/resize_mode/interpolation/mean/std, or None if opaque."""
    steps = getattr(transform, "transforms", None)
    if not isinstance(steps, (list, tuple)):
        return None
    d: dict[str, Any] = {"steps": [type(t).__name__ for t in steps], "random_steps": []}
    for t in steps:
        name = type(t).__name__
        if any(h in name for h in _RANDOM_HINTS):
            d["random_steps"].append(name)
        if name == "Resize":
            size = t.size
            if isinstance(size, int) or (isinstance(size, (list, tuple)) and len(size) == 1):
                d["resize_mode"] = "shortest"
                d["resize_to"] = _size2(size)
            else:
                d["resize_mode"] = "squash"
                d["resize_to"] = _size2(size)
                d["size"] = _size2(size)
            d["interpolation"] = _interp_name(t.interpolation)
        elif name == "ResizeKeepRatio":
            d["resize_mode"] = "longest" if float(getattr(t, "longest", 0.0)) >= 1.0 else "shortest"
            d["resize_to"] = _size2(t.size)
            d["interpolation"] = _interp_name(t.interpolation)
        elif name in ("CenterCrop", "CenterCropOrPad", "RandomResizedCrop", "RandomCrop"):
            d["size"] = _size2(t.size)
        elif name == "Normalize":
            d["mean"] = [float(x) for x in t.mean]
            d["std"] = [float(x) for x in t.std]
    return d


def compare_to_cfg(desc: dict[str, Any], cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """Field-by-field differences between a described transform and an open_clip preprocess config."""
    diffs: list[dict[str, Any]] = []
    want_size = _size2(cfg.get("size"))
    if "size" in desc and want_size is not None and desc["size"] != want_size:
        diffs.append({"field": "size", "expected": want_size, "actual": desc["size"]})
    want_mode = cfg.get("resize_mode") or "shortest"
    if "resize_mode" in desc and desc["resize_mode"] != want_mode:
        diffs.append({"field": "resize_mode", "expected": want_mode, "actual": desc["resize_mode"]})
    want_interp = "bilinear" if cfg.get("interpolation") == "bilinear" else "bicubic"
    if "interpolation" in desc and desc["interpolation"] != want_interp:
        diffs.append({"field": "interpolation", "expected": want_interp, "actual": desc["interpolation"]})
    for key in ("mean", "std"):
        if key in desc and cfg.get(key) is not None:
            want = [float(x) for x in cfg[key]]
            if len(want) != len(desc[key]) or not np.allclose(want, desc[key], rtol=0, atol=1e-6):
                diffs.append({"field": key, "expected": want, "actual": desc[key]})
    if "Normalize" not in desc["steps"]:
        diffs.append({"field": "normalize", "expected": "Normalize(mean, std)", "actual": "missing"})
    return diffs


def random_pixels(ctx: Context, extra: int) -> list[torch.Tensor]:
    """The user's preprocess run ``extra`` more times; empty if images came in as tensors."""
    pre, pils = ctx.inputs.user_preprocess, ctx.inputs.pils
    if pre is None or pils is None:
        return []
    return [stack_pixels(pre, pils) for _ in range(extra)]


def check_preprocess(ctx: Context, findings: Findings, *, expected: dict[str, Any] | None,
                     repeats: list[torch.Tensor]) -> bool:
    """``preprocess_random`` and ``preprocess_mismatch``; returns True if a fix to preprocessing applies."""
    assert ctx.baseline is not None
    inp = ctx.inputs
    if inp.pils is None:
        findings.skipped("preprocess_mismatch", "images were given as a preprocessed tensor")
        findings.skipped("preprocess_random", "images were given as a preprocessed tensor")
        return False
    if inp.user_preprocess is None:
        findings.ok("preprocess_mismatch", "the model's own eval transform was used (no preprocess given)")
        findings.ok("preprocess_random", "the model's own eval transform is deterministic")
        return False
    fix_needed = False
    desc = describe_transform(inp.user_preprocess)

    varying = [px for px in repeats if px.shape != inp.pixels_user.shape or not torch.equal(px, inp.pixels_user)]
    if varying:
        same_shape = [px for px in repeats if px.shape == inp.pixels_user.shape]
        runs = [ctx.baseline] + [ctx.eval_probs(pixels=px) for px in same_shape]
        sev = spread(runs)
        pix = max((max_abs_diff(px.numpy(), inp.pixels_user.numpy()) for px in same_shape), default=None)
        findings.add(Cause(
            "preprocess_random", sev, "problem",
            "your preprocess gives different pixels for the same image on each call"
            + (f" ({', '.join(desc['random_steps'])})" if desc and desc["random_steps"] else "")
            + f"; probabilities spread by {sev:.3g} over {len(runs)} calls in eval mode",
            {"calls": len(repeats) + 1, "pixel_max_abs_diff": pix, "spread_eval": sev,
             "random_steps": desc["random_steps"] if desc else None, "steps": desc["steps"] if desc else None},
            FIX_RANDOM,
        ))
        fix_needed = True
    else:
        findings.ok("preprocess_random", f"{len(repeats) + 1} calls of your preprocess gave identical pixels")

    cfg = dict(expected) if expected is not None else preprocess_cfg_of(ctx.model)
    if cfg is None or inp.pixels_expected is None:
        findings.skipped("preprocess_mismatch", "no expected preprocessing known (model has no "
                                                "visual.preprocess_cfg and none was given)")
        return fix_needed
    diffs = compare_to_cfg(desc, cfg) if desc is not None else []
    comparable = inp.pixels_expected.shape == inp.pixels_user.shape
    pixel_diff = max_abs_diff(inp.pixels_user.numpy(), inp.pixels_expected.numpy()) if comparable else None
    p_expected = ctx.eval_probs(pixels=inp.pixels_expected)
    sev = max_abs_diff(ctx.baseline, p_expected)
    evidence: dict[str, Any] = {
        "expected": {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()},
        "yours": {k: v for k, v in (desc or {}).items() if k != "random_steps"} if desc else "opaque callable",
        "differences": diffs,
        "pixel_shape": {"yours": list(inp.pixels_user.shape[1:]), "expected": list(inp.pixels_expected.shape[1:])},
        "pixel_max_abs_diff": pixel_diff,
        "max_abs_prob_diff": sev,
    }
    if varying and not diffs:
        findings.ok("preprocess_mismatch", "apart from its randomness, your preprocess matches the model's")
        return fix_needed
    if not diffs and sev <= PROB_TOL:
        findings.ok("preprocess_mismatch", "your preprocess matches the model's "
                                           f"({cfg.get('size')}, {cfg.get('resize_mode')}, {cfg.get('interpolation')})")
        return fix_needed
    fields = ", ".join(d["field"] for d in diffs) or "pixels"
    findings.add(Cause(
        "preprocess_mismatch", sev, "problem",
        f"your preprocess differs from the one the model was trained with ({fields}); probabilities differ by "
        f"up to {sev:.3g} - consistently wrong, and different from every correctly preprocessed run",
        evidence, FIX_MISMATCH,
    ))
    return True
