"""Where steadyclip's time goes, next to a bare open_clip forward, in one process.

Run in one child process so both sides share the same load, the same weights
object and the same moment's machine noise:

- an interleaved A/B of ``Engine.embed_pixels`` vs the bare best-effort loop
  (inference_mode, ``model.encode_image`` on micro-batches, ``F.normalize``);
- the price of each thing the engine adds per forward: ``ensure_inference_state``,
  ``check_buffers``, entering/leaving ``determinism.applied``, the float64
  numpy normalisation, running the forward under the strict flags;
- padding waste of fixed-shape tails, the one-time self-checks, and why the
  bf16 ``fast`` profile is slow on this CPU (torch.profiler's top operators).
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


def _pair(a: Callable[[], Any], b: Callable[[], Any], reps: int) -> tuple[float, float]:
    """Median seconds of ``a`` and of ``b``, calls alternated so both see the same noise."""
    a()
    b()
    ta: list[float] = []
    tb: list[float] = []
    for _ in range(reps):
        for fn, acc in ((a, ta), (b, tb)):
            t = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - t)
    return statistics.median(ta), statistics.median(tb)


def _ab(bare: Callable[[], Any], engine: Callable[[], Any], rounds: int, n: int) -> dict[str, Any]:
    """Alternate the two sides ``rounds`` times; images/s best and median for each."""
    tb: list[float] = []
    te: list[float] = []
    for r in range(rounds):
        order = (bare, engine) if r % 2 == 0 else (engine, bare)
        for fn in order:
            t = time.perf_counter()
            fn()
            (tb if fn is bare else te).append(time.perf_counter() - t)
    return {"rounds": rounds, "images": n,
            "bare_best_ips": n / min(tb), "engine_best_ips": n / min(te),
            "bare_median_ips": n / statistics.median(tb), "engine_median_ips": n / statistics.median(te),
            "ratio_best": min(tb) / min(te), "ratio_median": statistics.median(tb) / statistics.median(te)}


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
    """Spec: arch, weights, pixels (.npy), micro_batch, threads, rounds, reps."""
    logging.getLogger().setLevel(logging.ERROR)
    import steadyclip
    from steadyclip import determinism
    from steadyclip import engine as engine_mod

    mb, threads = int(spec["micro_batch"]), int(spec["threads"])
    rounds, reps = int(spec.get("rounds", 4)), int(spec.get("reps", 5))
    loaded = steadyclip.load(spec["arch"], pretrained=spec["weights"])
    model: Any = loaded.model
    t = time.perf_counter()
    eng = steadyclip.Engine(loaded, micro_batch=mb, threads=threads, text_cache=None)
    _ = eng.provenance  # both self-checks
    self_checks_s = time.perf_counter() - t
    pixels = torch.from_numpy(np.load(spec["pixels"]))  # (N, 3, H, W)
    n = pixels.shape[0]
    batch = pixels[:mb]

    def bare_all() -> np.ndarray:
        with torch.inference_mode():
            return np.concatenate([F.normalize(model.encode_image(c), dim=-1).numpy() for c in pixels.split(mb)])

    out: dict[str, Any] = {"arch": spec["arch"], "micro_batch": mb, "threads": threads,
                           "batch_path": eng.provenance.batch_path, "self_checks_s": self_checks_s}
    out["ab"] = _ab(bare_all, lambda: eng.embed_pixels(pixels), rounds, n)
    out["engine_vs_bare_max_abs"] = float(np.abs(bare_all() - eng.embed_pixels(pixels)).max())

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
    plain_s, strict_s = _pair(fwd, fwd_strict, reps)
    costs = {
        "forward_s": plain_s,
        "forward_under_strict_flags_s": strict_s,
        "strict_flags_slowdown": strict_s / plain_s,
        "ensure_inference_state_s": _med(loaded.ensure_inference_state, 20),
        "check_buffers_s": _med(loaded.check_buffers, 20),
        "applied_enter_exit_s": _med(applied_only, 20),
        "normalise_numpy_f64_s": _med(lambda: engine_mod._normalise(raw, "image"), 50),
        "normalise_torch_s": _med(lambda: F.normalize(torch.from_numpy(raw), dim=-1), 50),
        "embed_pixels_one_batch_s": _med(lambda: eng.embed_pixels(batch), reps),
    }
    per_call = (costs["ensure_inference_state_s"] + costs["check_buffers_s"] + costs["applied_enter_exit_s"]
                + costs["normalise_numpy_f64_s"])
    costs["engine_fixed_overhead_per_call_s"] = per_call
    costs["overhead_share_of_one_batch"] = per_call / costs["forward_s"]
    out["costs"] = costs
    # Tails: with the fixed-shape path a tail of 2 rows costs a full micro-batch forward.
    tail = pixels[:2]
    with torch.inference_mode():
        costs["tail2_bare_s"] = _med(lambda: model.encode_image(tail), reps)
    costs["tail2_engine_s"] = _med(lambda: eng.embed_pixels(tail), reps)
    out["padding"] = {"images": n, "forwards": -(-n // mb),
                      "rows_computed": -(-n // mb) * mb if eng.provenance.batch_path == "fixed-shape" else n}
    out["padding"]["waste_share"] = 1 - n / out["padding"]["rows_computed"]
    out["top_ops_strict"] = _top_ops(lambda: eng.embed_pixels(batch))
    out["top_ops_bare"] = _top_ops(fwd)
    if spec.get("bf16"):
        out["bf16"] = _bf16(model, batch, reps)
    return out


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
