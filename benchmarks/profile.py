"""Where steadyclip's time goes, next to a bare open_clip forward, in one process.

Run in one child process so both sides share the same load, the same weights
object and the same moment's machine noise:

- ``Engine.embed_pixels`` vs the bare best-effort loop (inference_mode,
  ``model.encode_image`` on the same micro-batch, ``F.normalize``), timed in
  adjacent pairs;
- the price of each thing the engine adds per call: ``ensure_inference_state``,
  ``check_buffers``, entering/leaving ``determinism.applied``, the float64
  numpy normalisation, and the forward itself under the strict flags;
- what tails and one-image requests cost on the fixed-shape path, and which
  smaller shapes would give bitwise the same rows; the one-time self-checks;
  why the bf16 ``fast`` profile is slow here (torch.profiler's top operators).
"""
from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F


def _med(fn: Callable[[], Any], reps: int) -> float:
    """Median seconds of ``reps`` calls (after one untimed call)."""
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _paired(a: Callable[[], Any], b: Callable[[], Any], budget_s: float) -> dict[str, Any]:
    """Time ``a`` and ``b`` in adjacent pairs (order alternating) until ``budget_s`` is spent.

    Each pair sees the same moment's background load, so the median of the per-pair
    ratios ``t_b / t_a`` is robust to the bursty noise of a shared machine, where
    best-of and whole-run medians are not.
    """
    a()
    b()
    ta: list[float] = []
    tb: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(ta) < 5 or (time.perf_counter() < deadline and len(ta) < 60):
        for fn, acc in ((a, ta), (b, tb)) if len(ta) % 2 == 0 else ((b, tb), (a, ta)):
            t = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - t)
    ratios = sorted(y / x for x, y in zip(ta, tb))
    q = statistics.quantiles(ratios, n=4) if len(ratios) >= 2 else [ratios[0]] * 3
    return {"pairs": len(ta), "a_median_s": statistics.median(ta), "b_median_s": statistics.median(tb),
            "ratio_median": statistics.median(ratios), "ratio_q1": q[0], "ratio_q3": q[2]}


def _top_ops(fn: Callable[[], Any], k: int = 6) -> list[dict[str, Any]]:
    from torch.profiler import ProfilerActivity, profile

    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    return [{"op": e.key, "self_ms": e.self_cpu_time_total / 1000.0, "share": e.self_cpu_time_total / total,
             "calls": e.count} for e in events[:k]]


def run_profile(spec: dict[str, Any]) -> dict[str, Any]:
    """Spec: arch, weights, pixels (.npy), micro_batch, threads, pair_budget_s, reps, bf16."""
    logging.getLogger().setLevel(logging.ERROR)
    import steadyclip
    from steadyclip.numerics import determinism
    from steadyclip.numerics import head as head_mod

    mb, threads = int(spec["micro_batch"]), int(spec["threads"])
    reps = int(spec.get("reps", 3))
    loaded = steadyclip.load(spec["arch"], pretrained=spec["weights"])
    model: Any = loaded.model
    t = time.perf_counter()
    eng = steadyclip.Engine(loaded, micro_batch=mb, threads=threads, text_cache=None)
    _ = eng.provenance  # both self-checks (the parent gives this process an empty cache dir)
    self_checks_s = time.perf_counter() - t
    t = time.perf_counter()
    _ = steadyclip.Engine(loaded, micro_batch=mb, threads=threads, text_cache=None).provenance
    remembered_s = time.perf_counter() - t
    pixels = torch.from_numpy(np.load(spec["pixels"]))  # (N, 3, H, W)
    n = pixels.shape[0]
    batch = pixels[:mb]

    budget = float(spec.get("pair_budget_s", 20.0))

    def bare(x: torch.Tensor) -> np.ndarray:
        """What a careful open_clip user runs per micro-batch (the contender (2) loop)."""
        with torch.inference_mode():
            y: np.ndarray = F.normalize(model.encode_image(x), dim=-1).numpy()
        return y

    out: dict[str, Any] = {"arch": spec["arch"], "micro_batch": mb, "threads": threads, "images": n,
                           "batch_path": eng.provenance.batch_path, "self_checks_s": self_checks_s,
                           "self_checks_remembered_s": remembered_s}
    # Engine vs bare, one micro-batch per call, in adjacent pairs: speed ratio = t_bare / t_engine.
    ab = _paired(lambda: eng.embed_pixels(batch), lambda: bare(batch), budget)
    out["ab"] = {**ab, "engine_speed_ratio": ab["ratio_median"],
                 "engine_ips": mb / ab["a_median_s"], "bare_ips": mb / ab["b_median_s"]}
    out["engine_vs_bare_max_abs"] = float(np.abs(bare(batch) - eng.embed_pixels(batch)).max())

    def fwd() -> torch.Tensor:
        with torch.inference_mode():
            y: torch.Tensor = model.encode_image(batch)
        return y

    def fwd_strict() -> torch.Tensor:
        with determinism.applied(eng.profile, "cpu"), torch.inference_mode():
            y: torch.Tensor = model.encode_image(batch)
        return y

    def applied_only() -> None:
        with determinism.applied(eng.profile, "cpu"):
            pass

    raw = fwd().float().numpy()
    flags = _paired(fwd, fwd_strict, budget)  # slowdown = t_strict / t_plain
    costs = {
        "forward_s": flags["a_median_s"],
        "forward_under_strict_flags_s": flags["b_median_s"],
        "strict_flags_slowdown": flags["ratio_median"],
        "strict_flags_slowdown_iqr": [flags["ratio_q1"], flags["ratio_q3"]],
        "strict_flags_pairs": flags["pairs"],
        "ensure_inference_state_s": _med(loaded.ensure_inference_state, 20),
        "check_buffers_s": _med(loaded.check_buffers, 20),
        "applied_enter_exit_s": _med(applied_only, 20),
        "normalise_numpy_f64_s": _med(lambda: head_mod.normalise(raw, "image"), 50),
        "normalise_torch_s": _med(lambda: F.normalize(torch.from_numpy(raw), dim=-1), 50),
    }
    per_call = (costs["ensure_inference_state_s"] + costs["check_buffers_s"] + costs["applied_enter_exit_s"]
                + costs["normalise_numpy_f64_s"])
    costs["engine_fixed_overhead_per_call_s"] = per_call
    costs["overhead_share_of_one_batch"] = per_call / costs["forward_s"]
    out["costs"] = costs
    out["tails"] = _tails(eng, model, batch, budget / 4)
    opt = steadyclip.Engine(loaded, micro_batch=mb, threads=threads, text_cache=None, onednn=True)
    one = _paired(lambda: eng.embed_pixels(batch), lambda: opt.embed_pixels(batch), budget / 2)
    out["onednn_opt_in"] = {"pairs": one["pairs"], "speed_ratio": 1 / one["ratio_median"],  # opt-in vs default
                            "default_s": one["a_median_s"], "opt_in_s": one["b_median_s"],
                            "max_abs_vs_default": float(np.abs(opt.embed_pixels(batch) - eng.embed_pixels(batch)).max()),
                            "batch_path": opt.provenance.batch_path}
    out["top_ops_strict"] = _top_ops(lambda: eng.embed_pixels(batch))
    out["top_ops_bare"] = _top_ops(fwd)
    if spec.get("bf16"):
        out["bf16"] = _bf16(model, batch, reps)
    return out


def _tails(eng: Any, model: Any, batch: torch.Tensor, budget: float) -> dict[str, Any]:
    """What a short tail (or a one-image request) costs, and which smaller shapes give bitwise the same rows.

    On the fixed-shape path a tail of k < micro-batch rows is padded to a full
    micro-batch. If a k'-row forward (k <= k' < micro-batch) gives bitwise the rows
    of the full one, padding to k' would keep the guarantee at a fraction of the cost.
    """
    from steadyclip.numerics import determinism

    mb = batch.shape[0]
    with determinism.applied(eng.profile, "cpu"), torch.inference_mode():  # the engine's numerics
        full = model.encode_image(batch).numpy()
        shapes = {}
        for k in sorted({1, 2, 4, mb // 2} - {0, mb}):
            rows = model.encode_image(batch[:k]).numpy()
            shapes[str(k)] = {"bitwise_equal_to_full": bool(np.array_equal(rows, full[:k])),
                              "max_abs": float(np.abs(rows - full[:k]).max()),
                              "forward_s": _med(lambda k=k: model.encode_image(batch[:k]), 2)}
        full_s = _med(lambda: model.encode_image(batch), 2)
    one = batch[:1]
    pair = _paired(lambda: eng.embed_pixels(one), lambda: model.encode_image(one), budget)
    return {"shapes": shapes, "full_forward_s": full_s,
            "one_image_engine_s": pair["a_median_s"], "one_image_bare_s": pair["b_median_s"],
            "batch_path": eng.provenance.batch_path}


def _bf16(model: Any, batch: torch.Tensor, reps: int) -> dict[str, Any]:
    """fp32 vs bf16 autocast vs an all-bf16 copy of the weights: one micro-batch forward each."""
    import copy

    def fp32() -> torch.Tensor:
        with torch.inference_mode():
            out: torch.Tensor = model.encode_image(batch)
        return out

    def autocast() -> torch.Tensor:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            out: torch.Tensor = model.encode_image(batch)
        return out

    pure = copy.deepcopy(model).to(torch.bfloat16)
    xb = batch.to(torch.bfloat16)

    def pure_bf16() -> torch.Tensor:
        with torch.inference_mode():
            out: torch.Tensor = pure.encode_image(xb)
        return out

    res: dict[str, Any] = {"fp32_s": _med(fp32, reps), "autocast_bf16_s": _med(autocast, reps),
                           "pure_bf16_s": _med(pure_bf16, reps)}
    ref = F.normalize(fp32().float(), dim=-1)
    for name, fn in (("autocast", autocast), ("pure", pure_bf16)):
        res[f"{name}_min_cosine_vs_fp32"] = float((F.normalize(fn().float(), dim=-1) * ref).sum(-1).min())
    res["top_ops_autocast"] = _top_ops(autocast)
    res["top_ops_fp32"] = _top_ops(fp32)
    return res
