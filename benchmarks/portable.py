"""Portable vs strict vs open_clip fp32: what the same bits on every CPU cost.

    python -m benchmarks.portable              # ViT-B-32 and RN50 (random init), 1 thread and all cores, ~10 min
    python -m benchmarks.portable --quick      # ViT-B-32 at 1 thread, one repeat

Every figure comes from its own process (portable's variables must be set before torch loads, so
the three cannot share one), the kinds interleaved and repeated, the median kept:
(a) model-only: images/s of the image tower at batch 8 after a warm-up - open_clip's ``encode_image``
    under ``inference_mode``, steadyclip's forward core (strict: MKL; portable: the pinned OpenBLAS
    GEMM and baseline ATen kernels);
(b) whole process: the wall time of a fresh process that loads the model, builds an engine (strict or
    portable, with its self-checks; portable also its golden proof when one exists) and embeds 32
    images; open_clip's: load, preprocess and encode the same 32 images.
Writes ``benchmarks/results/<date>-vm-portable.{json,md}``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median
from typing import Any

REPO = Path(__file__).resolve().parent.parent
KINDS = ("strict", "portable", "openclip")

_WORKER = r"""
import json, sys, time
mode, kind, arch, weights, threads = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
import torch
torch.set_num_threads(threads)
from steadyclip.engine.probe_inputs import probe_images
if kind == "openclip":
    import open_clip
    from safetensors.torch import load_file
    model, _, preprocess = open_clip.create_model_and_transforms(arch)
    model.load_state_dict(load_file(weights)); model.eval()
    def encode(x):
        with torch.inference_mode():
            return model.encode_image(x)
    size = model.visual.image_size
    size = (size, size) if isinstance(size, int) else tuple(size)
else:
    import steadyclip
    from steadyclip.engine._core import ForwardCore
    from steadyclip.engine.settings import EngineSettings
    loaded = steadyclip.load(arch, pretrained=weights)
    size, preprocess = loaded.info.preprocess.size, loaded.preprocess
if mode == "whole":
    images = probe_images(size, n=32)
    if kind == "openclip":
        for s in range(0, 32, 8):
            encode(torch.stack([preprocess(im) for im in images[s:s + 8]]))
    else:
        steadyclip.Engine(loaded, profile=kind, threads=threads, replicas=1).embed_images(images)
    print(json.dumps({}))
    sys.exit(0)
x = torch.from_numpy(__import__("numpy").random.default_rng(0).integers(0, 256, (8, 3, *size)).astype("float32") / 64 - 2)
if kind != "openclip":
    core = ForwardCore(loaded, EngineSettings(profile=kind, threads=threads, micro_batch=8))
    encode = lambda x: core.forward_local("image", x)
    _ = core.threads  # the thread self-check, before any clock
encode(x)
n, t0 = 0, time.perf_counter()
while n < 3 or time.perf_counter() - t0 < 4.0:
    encode(x); n += 1
print(json.dumps({"images_per_s": 8 * n / (time.perf_counter() - t0), "threads": torch.get_num_threads()}))
"""


def _env(kind: str) -> dict[str, str]:
    from steadyclip.numerics.early import (
        PORTABLE_ENV,
        PORTABLE_SPEED_ENV,
        portable_environ,
    )

    env = {k: v for k, v in os.environ.items() if k not in PORTABLE_ENV and k not in PORTABLE_SPEED_ENV}
    env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", "")
    return portable_environ(env) if kind == "portable" else env  # what the CLI arranges for itself


def _run(mode: str, kind: str, arch: str, weights: Path, threads: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _WORKER, mode, kind, arch, str(weights), str(threads)],
                          capture_output=True, text=True, env=_env(kind), timeout=1200, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} {kind} {arch} failed: {proc.stderr[-2000:]}")
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "wall_s": wall}


def _weights(arch: str, folder: Path) -> Path:
    import open_clip
    import torch
    from safetensors.torch import save_file

    path = folder / f"{arch}.safetensors"
    torch.manual_seed(0)
    model = open_clip.create_model(arch)
    save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def measure(archs: list[str], thread_counts: list[int], repeats: int) -> dict[str, Any]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in archs:
            weights = _weights(arch, Path(tmp))
            for threads in thread_counts:
                fig: dict[str, dict[str, list[float]]] = {k: {"model": [], "whole": []} for k in KINDS}
                for _ in range(repeats):
                    for kind in KINDS:  # interleaved: drift in the machine's speed hits all three alike
                        fig[kind]["model"].append(_run("model", kind, arch, weights, threads)["images_per_s"])
                        fig[kind]["whole"].append(_run("whole", kind, arch, weights, threads)["wall_s"])
                row = {"arch": arch, "threads": threads,
                       **{f"{k}_images_per_s": round(median(v["model"]), 2) for k, v in fig.items()},
                       **{f"{k}_whole_s": round(median(v["whole"]), 2) for k, v in fig.items()}}
                row["portable_vs_strict"] = round(row["portable_images_per_s"] / row["strict_images_per_s"], 3)
                row["portable_vs_openclip"] = round(row["portable_images_per_s"] / row["openclip_images_per_s"], 3)
                rows.append(row)
                print(json.dumps(row), flush=True)
    return {"rows": rows, "repeats": repeats, "cpu": _cpu(), "host": socket.gethostname(),
            "date": time.strftime("%Y-%m-%d")}


def _cpu() -> dict[str, Any]:
    from steadyclip.numerics.cpuid import cpu_facts

    return {**cpu_facts(), "cpus": os.cpu_count(), "machine": platform.machine()}


def markdown(doc: dict[str, Any]) -> str:
    cpu = doc["cpu"]
    where = (f"CPU: {cpu.get('cpu_vendor')} {cpu.get('cpu_model')} (family {cpu.get('family')} model "
             f"{cpu.get('model')}; {cpu.get('features')}), {cpu['cpus']} CPUs. Median of {doc['repeats']} "
             "interleaved runs, each in its own process. `python -m benchmarks.portable`.")
    head = ("| arch | threads | strict img/s | portable img/s | open_clip img/s | portable/strict | "
            "portable/open_clip | whole process s: strict / portable / open_clip |")
    lines = [f"# Portable vs strict vs open_clip fp32 ({doc['date']})", "", where, "", head,
             "|---|---|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        lines.append(f"| {r['arch']} | {r['threads']} | {r['strict_images_per_s']} | {r['portable_images_per_s']} | "
                     f"{r['openclip_images_per_s']} | **{r['portable_vs_strict']}x** | {r['portable_vs_openclip']}x | "
                     f"{r['strict_whole_s']} / {r['portable_whole_s']} / {r['openclip_whole_s']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="ViT-B-32 at 1 thread, one repeat")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    cpus = os.cpu_count() or 1
    archs, threads = (["ViT-B-32"], [1]) if args.quick else (["ViT-B-32", "RN50"], sorted({1, cpus}))
    doc = measure(archs, threads, 1 if args.quick else args.repeats)
    out = REPO / "benchmarks" / "results" / f"{doc['date']}-vm-portable"
    out.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(doc))
    print(markdown(doc))


if __name__ == "__main__":
    main()
