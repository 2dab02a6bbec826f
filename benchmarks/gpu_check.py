"""The GPU check (issue 15): run it whenever a CUDA machine is at hand; CI never needs it. At most ~8 minutes.

    python -m benchmarks.gpu_check --out gpu-check.json               # ViT-B-32 and RN50 on cuda
    python -m benchmarks.gpu_check --device cpu --arch steadyclip-shapes --allow-emulated-bf16 --quick
                                                                      # smoke test of the script on CPU

Measures, on random-init weights saved to a temp file (no hub needed):
1. strict bitwise across two fresh processes, and across batch sizes (row alone vs in a batch);
2. CPU vs CUDA drift of strict (min cosine, max |d|);
3. fast drift vs strict (the engine's own measurement, plus the same images directly), and fast
   bitwise across two processes;
4. throughput, model-only, same micro-batch: open_clip fp32, open_clip AMP (autocast fp16),
   steadyclip strict, steadyclip fast.
Prints one JSON document (also written to ``--out``); every figure is measured, none assumed.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent


def _checkpoint(arch: str, folder: Path) -> Path:
    import open_clip
    import torch
    from safetensors.torch import save_file

    if arch == "steadyclip-shapes":
        from steadyclip.model.registry import register_demo_config

        register_demo_config()
    torch.manual_seed(0)
    model = open_clip.create_model(arch)
    path = folder / f"{arch}.safetensors"
    save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def _pixels(size: int, n: int) -> Any:
    import torch

    return torch.randn((n, 3, size, size), generator=torch.Generator().manual_seed(7))  # (N, 3, H, W)


def _engine(arch: str, ckpt: str, device: str, profile: str, mb: int, emulated: bool) -> Any:
    import steadyclip

    loaded = steadyclip.load(arch, pretrained=ckpt, device=device)
    kw = {"allow_emulated_bf16": True} if emulated and profile == "fast" else {}
    return steadyclip.Engine(loaded, profile=profile, micro_batch=mb, text_cache=None, **kw)


def child(args: argparse.Namespace) -> int:
    """One fresh process: embed the fixed pixels, save them (for the two-process comparison)."""
    engine = _engine(args.arch, args.ckpt, args.device, args.profile, args.micro_batch, args.allow_emulated_bf16)
    size = engine.loaded.info.preprocess.size[0]
    np.save(args.child_out, engine.embed_pixels(_pixels(size, args.images)))
    return 0


def _two_processes(args: argparse.Namespace, ckpt: Path, profile: str, work: Path) -> bool:
    outs = []
    for i in range(2):
        out = work / f"{args.arch}-{profile}-{i}.npy"
        cmd = [sys.executable, "-m", "benchmarks.gpu_check", "--child", "--arch", args.arch, "--ckpt", str(ckpt),
               "--device", args.device, "--profile", profile, "--micro-batch", str(args.micro_batch),
               "--images", str(args.images), "--child-out", str(out)]
        if args.allow_emulated_bf16:
            cmd.append("--allow-emulated-bf16")
        env = {**os.environ, "STEADYCLIP_CACHE_DIR": str(work / f"cache-{profile}-{i}"),
               "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
        subprocess.run(cmd, env=env, cwd=REPO, check=True, timeout=240)
        outs.append(np.load(out))
    return bool(np.array_equal(outs[0], outs[1]))


def _drift(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    cos = (a.astype(np.float64) * b).sum(-1)
    return {"min_cosine": float(cos.min()), "max_abs": float(np.abs(a.astype(np.float64) - b).max())}


def _rate(fn: Any, n: int, reps: int) -> float:
    fn()  # warm-up: kernels, allocator, self-checks
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return n / best


def _open_clip_rates(arch: str, ckpt: Path, device: str, px: Any, mb: int, reps: int) -> dict[str, float]:
    import open_clip
    import torch

    model = open_clip.create_model(arch, pretrained=str(ckpt), device=device).eval()

    def run(amp: bool) -> Any:
        with torch.inference_mode(), torch.autocast(device_type=device, dtype=torch.float16, enabled=amp):
            out = [model.encode_image(c.to(device)).float().cpu() for c in px.split(mb)]
        return out

    rates = {"openclip_fp32_ips": _rate(lambda: run(False), px.shape[0], reps)}
    if device == "cuda":
        rates["openclip_amp_fp16_ips"] = _rate(lambda: run(True), px.shape[0], reps)
    return rates


def check_arch(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    ckpt = _checkpoint(args.arch, work)
    out: dict[str, Any] = {"arch": args.arch, "device": args.device, "micro_batch": args.micro_batch}
    strict = _engine(args.arch, str(ckpt), args.device, "strict", args.micro_batch, False)
    size = strict.loaded.info.preprocess.size[0]
    px = _pixels(size, args.images)
    s = strict.embed_pixels(px)
    out["strict_two_processes_bitwise"] = _two_processes(args, ckpt, "strict", work)
    out["strict_batch_sizes_bitwise"] = all(bool(np.array_equal(strict.embed_pixels(px[:k]), s[:k]))
                                            for k in (1, 3, args.micro_batch + 1) if k <= px.shape[0])
    if args.device != "cpu":
        cpu = _engine(args.arch, str(ckpt), "cpu", "strict", args.micro_batch, False)
        out["strict_cpu_vs_cuda"] = _drift(cpu.embed_pixels(px), s)
        del cpu
    fast = _engine(args.arch, str(ckpt), args.device, "fast", args.micro_batch, args.allow_emulated_bf16)
    f = fast.embed_pixels(px)
    rp = fast.provenance.reduced_precision or {}
    out["fast"] = {"precision": fast.profile.precision, "drift_vs_strict_probe": rp.get("drift_vs_strict"),
                   "drift_vs_strict_these_images": _drift(f, s), "threads": rp.get("threads"),
                   "two_processes_bitwise": _two_processes(args, ckpt, "fast", work),
                   "flags": {k: fast.provenance.flags.get(k) for k in ("cudnn_deterministic", "cudnn_benchmark",
                                                                       "deterministic_algorithms", "compute_dtype")}}
    out["strict_flags"] = {k: strict.provenance.flags.get(k) for k in (
        "deterministic_algorithms", "cudnn_deterministic", "cudnn_allow_tf32", "cuda_matmul_allow_tf32",
        "float32_matmul_precision")} | {"CUBLAS_WORKSPACE_CONFIG": os.environ.get("CUBLAS_WORKSPACE_CONFIG")}
    n = px.shape[0]
    rates = _open_clip_rates(args.arch, ckpt, args.device, px, args.micro_batch, args.reps)
    rates["steadyclip_strict_ips"] = _rate(lambda: strict.embed_pixels(px), n, args.reps)
    rates["steadyclip_fast_ips"] = _rate(lambda: fast.embed_pixels(px), n, args.reps)
    base = rates["openclip_fp32_ips"]
    out["throughput"] = {**rates, **{k.replace("_ips", "_x_fp32"): v / base for k, v in rates.items()}}
    return out


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="ViT-B-32,RN50", help="comma-separated open_clip architectures")
    p.add_argument("--device", default="cuda")
    p.add_argument("--micro-batch", type=int, default=32)
    p.add_argument("--images", type=int, default=128)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="16 images, micro-batch 8, 1 rep (smoke test)")
    p.add_argument("--allow-emulated-bf16", action="store_true", help="CPU smoke test on a CPU without native bf16")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--budget-s", type=float, default=480.0, help="stop before another architecture past this")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--ckpt", help=argparse.SUPPRESS)
    p.add_argument("--profile", default="strict", help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.images, args.micro_batch, args.reps = 16, 8, 1
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    import steadyclip  # noqa: F401 - before torch touches CUDA: sets CUBLAS_WORKSPACE_CONFIG

    if args.child:
        return child(args)
    import torch

    start = time.perf_counter()
    doc: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda,
                           "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                           "archs": {}, "skipped": []}
    with tempfile.TemporaryDirectory(prefix="steadyclip-gpu-check-") as tmp:
        for arch in args.arch.split(","):
            if time.perf_counter() - start > args.budget_s:
                doc["skipped"].append(f"{arch}: over the {args.budget_s:.0f}s budget")
                continue
            sub = argparse.Namespace(**{**vars(args), "arch": arch})
            doc["archs"][arch] = check_arch(sub, Path(tmp))
            print(f"[{time.perf_counter() - start:6.1f}s] {arch} done", file=sys.stderr, flush=True)
    doc["total_s"] = time.perf_counter() - start
    text = json.dumps(doc, indent=1, sort_keys=True, default=str)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
