"""What ``steadyclip verify`` costs: ``verify --all`` of a batch file vs the job that made it, vs N forwards.

    python -m benchmarks.verify                 # the demo model, 64 images, well under a minute on 2 vCPUs
    python -m benchmarks.verify --rows 256 --out-dir /tmp/verify-bench

The claim (README "Verify a result"): verifying N rows costs one model load plus about N forwards.
In one run, each step in its own process at ``--threads`` (default 1), one engine replica, private caches:
(a) ``steadyclip batch`` of N demo images (labels, ``--embeddings``) into a Parquet file: wall seconds;
(b) ``steadyclip verify FILE --all --json``: wall seconds (every row must come back ``bitwise``);
(c) ``load()`` then ``Engine.classify`` of the N images (decode + N forwards + the head), timed after
    the imports (torch, open_clip, pyarrow, steadyclip's modules: several seconds on a cold 2-vCPU box,
    paid by any command); and, in another process, ``verify_results(FILE, sample=None)`` timed the same way.
Ratios: (b) / (a), and verify_results / (load + N forwards): about 1 when the claim holds.
Writes ``<out-dir>/<date>-vm-verify.{json,md}`` (default ``benchmarks/results``).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent

_TIMED = r"""
import json, sys, time
t0 = time.perf_counter()
import torch
torch.set_num_threads(int(sys.argv[1]))
import open_clip, pyarrow.dataset, pyarrow.parquet, steadyclip, steadyclip.verify, steadyclip.batch  # not the claim
from steadyclip.model.registry import demo_labels
what, path = sys.argv[2], sys.argv[3]
t1 = time.perf_counter()
out = {"import_s": t1 - t0}
if what == "verify":
    report = steadyclip.verify_results(path, sample=None)
    out |= {"verify_s": time.perf_counter() - t1, "verdict": report.verdict, "rows": len(report.rows)}
else:
    images = json.loads(open(path).read())
    loaded = steadyclip.load()
    t2 = time.perf_counter()
    with steadyclip.Engine(loaded, replicas=1, text_cache=None) as engine:
        engine.classify(images, demo_labels(), top_k=3)
    out |= {"load_s": t2 - t1, "forwards_s": time.perf_counter() - t2}
print(json.dumps(out))
"""


def _images(folder: Path, n: int) -> list[str]:
    """``n`` demo shape PNGs (seeded), the bundled model's own classes."""
    import numpy as np

    from steadyclip.demo.shapes import render
    from steadyclip.model.registry import DEMO_COLOURS, DEMO_SHAPES

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        path = folder / f"{i:04d}.png"
        render(DEMO_COLOURS[i % len(DEMO_COLOURS)], DEMO_SHAPES[i % len(DEMO_SHAPES)], rng).save(path)
        paths.append(str(path))
    return paths


def _env(tmp: Path, threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"STEADYCLIP_CACHE_DIR": str(tmp / "cache"), "HF_HUB_OFFLINE": "1", "PYTHONHASHSEED": "0",
                "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"})
    return env


def _wall(cmd: Sequence[str], env: dict[str, str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800, check=False)
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... exited {out.returncode}:\n{out.stderr[-2000:]}")
    return wall, out.stdout


def measure(n: int, threads: int) -> dict[str, Any]:
    """Every figure of one run (see the module docstring)."""
    from steadyclip.model.registry import demo_labels

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        paths = _images(tmp / "images", n)
        (tmp / "images.json").write_text(json.dumps(paths))
        env, steady = _env(tmp, threads), [sys.executable, "-m", "steadyclip"]
        out = tmp / "job.parquet"
        batch_s, _ = _wall([*steady, "batch", str(tmp / "images"), "--labels", ",".join(demo_labels()),
                            "--embeddings", "--out", str(out), "--replicas", "1", "--workers", "0",
                            "--threads", str(threads), "--no-progress"], env)
        verify_s, text = _wall([*steady, "verify", str(out), "--all", "--json"], env)
        report = json.loads(text)
        timed = {what: json.loads(_wall([sys.executable, "-c", _TIMED, str(threads), what, str(path)], env)[1])
                 for what, path in (("forwards", tmp / "images.json"), ("verify", out))}
    base = timed["forwards"]["load_s"] + timed["forwards"]["forwards_s"]
    return {"rows": n, "threads": threads, "batch_cli_s": batch_s, "verify_cli_s": verify_s,
            "verify_cli_verdict": report["verdict"], "verify_cli_checked": report["checked"],
            "load_s": timed["forwards"]["load_s"], "forwards_s": timed["forwards"]["forwards_s"],
            "verify_results_s": timed["verify"]["verify_s"], "verify_results_verdict": timed["verify"]["verdict"],
            "ratio_verify_to_batch_cli": verify_s / batch_s, "ratio_verify_to_load_plus_forwards":
            timed["verify"]["verify_s"] / base}


def _report(doc: dict[str, Any]) -> str:
    m = doc["measured"]
    return "\n".join([
        (f"# verify cost ({doc['date']}, {doc['cpu']}, {doc['cpus']} CPUs, {m['threads']} thread(s), "
        f"demo model, {m['rows']} images)"),
        "",
        "| step | seconds |",
        "|---|---|",
        f"| `steadyclip batch` (labels, embeddings), whole process | {m['batch_cli_s']:.2f} |",
        (f"| `steadyclip verify --all`, whole process ({m['verify_cli_checked']} rows "
        f"{m['verify_cli_verdict']}) | {m['verify_cli_s']:.2f} |"),
        f"| `load()` | {m['load_s']:.2f} |",
        f"| `Engine.classify` of the {m['rows']} images (decode + forwards + head) | {m['forwards_s']:.2f} |",
        f"| `verify_results(sample=None)` ({m['verify_results_verdict']}) | {m['verify_results_s']:.2f} |",
        "",
        (f"verify / batch job (whole processes): {m['ratio_verify_to_batch_cli']:.2f}x; "
        f"verify_results / (load + {m['rows']} forwards): {m['ratio_verify_to_load_plus_forwards']:.2f}x"),
    ]) + "\n"


def _cpu() -> str:
    from steadyclip.numerics.cpuid import cpu_facts

    return str(cpu_facts().get("cpu_model") or "unknown")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.verify", description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=64, help="images in the batch file (default 64)")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads in every step (default 1)")
    p.add_argument("--out-dir", type=Path, default=REPO / "benchmarks" / "results")
    args = p.parse_args(argv)
    measured = measure(args.rows, args.threads)
    doc = {"date": time.strftime("%Y-%m-%d"), "host": socket.gethostname(), "cpu": _cpu(),
           "cpus": len(os.sched_getaffinity(0)), "measured": measured}
    text = _report(doc)
    print(text)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.out_dir / f"{doc['date']}-vm-verify"
    stem.with_suffix(".json").write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    stem.with_suffix(".md").write_text(text)
    bad = {measured["verify_cli_verdict"], measured["verify_results_verdict"]} - {"bitwise"}
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
