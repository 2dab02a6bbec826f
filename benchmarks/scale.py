"""Every core, same bits: steadyclip's defaults vs a user's open_clip loop, at 1 core and at all cores.

    python -m benchmarks.scale              # 192 JPEGs, ViT-B-32 (random init), ~10 min at --repeats 3 on 2 vCPUs
    python -m benchmarks.scale --quick      # 24 JPEGs, a smoke run
    python -m benchmarks.scale --images 768 --no-server   # start-up amortised over 4x the work

Each job also reports its compute stage, so the report splits every wall time into serial start-up
(interpreter, imports, loading) and compute, and gives Amdahl's ceiling for the 1 -> all ratio.

Side by side in one run, alternating, each a whole process (start-up included):
(a) ``benchmarks.openclip_loop`` (DataLoader, ``num_workers`` = CPUs, batch 32, torch's default threads),
(b) ``steadyclip batch DIR --embeddings`` with its defaults, each under ``taskset -c 0`` and on all CPUs;
(c) ``steadyclip serve`` with 16 clients at ``--replicas 1`` and ``--replicas CPUs``, at 1 core and all
(alternating, best of the repeats).
Peak RSS is sampled over each process tree; an extra replica's cost is its USS (private memory: the
weights are shared copy-on-write, so RSS would count them once per process).
Writes ``benchmarks/results/<date>-<host>-scale.{json,md}``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import psutil

REPO = Path(__file__).resolve().parent.parent
ARCH = "ViT-B-32"


def _prep(work: Path, n: int) -> tuple[Path, Path]:
    """``n`` photo-like JPEGs (640x480 .. 1600x1200) and random-init ViT-B-32 weights as safetensors."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    from benchmarks.images import SIZES, render

    folder = work / "jpegs"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        w, h = SIZES[i % len(SIZES)]
        render(np.random.default_rng([12, i]), w, h).save(folder / f"img_{i:04d}.jpg", quality=90)
    torch.manual_seed(0)
    model = open_clip.create_model(ARCH)
    weights = work / "vit-b-32.safetensors"
    save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}, str(weights))
    return folder, weights


class _Sampler:
    """Peak RSS of a process tree (sum) and of its largest process, sampled every 50 ms."""

    def __init__(self, pid: int) -> None:
        self.root = psutil.Process(pid)
        self.peak_tree = self.peak_proc = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _procs(self) -> list[psutil.Process]:
        with contextlib.suppress(psutil.Error):
            return [self.root, *self.root.children(recursive=True)]
        return []

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            rss = []
            for p in self._procs():
                with contextlib.suppress(psutil.Error):
                    rss.append(p.memory_info().rss)
            if rss:
                self.peak_tree = max(self.peak_tree, sum(rss))
                self.peak_proc = max(self.peak_proc, max(rss))

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        return {"peak_rss_tree_mb": self.peak_tree / 2**20, "peak_rss_process_mb": self.peak_proc / 2**20}


def _cpu_prefix(cores: str) -> list[str]:
    return ["taskset", "-c", "0"] if cores == "1" else []


def _timed(cmd: Sequence[str], env: dict[str, str]) -> dict[str, Any]:
    """Wall time and peak RSS of one whole process, and its compute stage as it reports it.

    The job prints one JSON object on stdout: the loop's ``compute_s``, or ``steadyclip batch
    --json``'s summary (``elapsed_s``: the whole job, from scanning the input and starting the replicas
    to the finished file). Wall minus that is the job's serial start-up and exit (interpreter, imports,
    loading the model).
    """
    t = time.perf_counter()
    proc = subprocess.Popen(list(cmd), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    sampler = _Sampler(proc.pid)
    stdout, err = proc.communicate(timeout=1800)
    out = {"wall_s": time.perf_counter() - t, **sampler.stop()}
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {err.decode()[-2000:]}")
    reported = json.loads(stdout)
    out["compute_s"] = float(reported.get("compute_s", reported.get("elapsed_s")))
    return out


def _whole_process(folder: Path, weights: Path, work: Path, env: dict[str, str], repeats: int) -> dict[str, Any]:
    n = len(list(folder.glob("*.jpg")))
    cmds = {
        "openclip_loop": [sys.executable, "-m", "benchmarks.openclip_loop", str(weights), str(folder),
                          str(work / "oc.npy")],
        "steadyclip_batch": [sys.executable, "-m", "steadyclip", "batch", str(folder), "--embeddings",
                             "-m", ARCH, "--pretrained", str(weights), "--out", str(work / "sc.parquet"),
                             "--restart", "--no-progress", "--json"],
    }
    # Warm start for steadyclip (hash cache, self-check verdicts), as every run after a user's first.
    subprocess.run(cmds["steadyclip_batch"], env=env, check=True, capture_output=True)
    results: dict[str, Any] = {}
    # Every repeat runs all four (job x cores), the order reversed every other repeat, so a drift in the
    # machine's speed falls on both jobs and both core counts alike (the 1 -> all ratio included).
    order = [(name, cores) for cores in ("1", "all") for name in ("openclip_loop", "steadyclip_batch")]
    for rep in range(repeats):
        for name, cores in order if rep % 2 == 0 else order[::-1]:
            r = _timed(_cpu_prefix(cores) + cmds[name], env)
            results.setdefault(f"{name}@{cores}", []).append(r)
    summary = {}
    for key, runs in results.items():
        best = min(runs, key=lambda r: r["wall_s"])
        summary[key] = {"best_wall_s": best["wall_s"], "img_per_s": n / best["wall_s"],
                        "walls_s": [r["wall_s"] for r in runs],
                        "startup_s": [r["wall_s"] - r["compute_s"] for r in runs],
                        "peak_rss_tree_mb": max(r["peak_rss_tree_mb"] for r in runs),
                        "peak_rss_process_mb": max(r["peak_rss_process_mb"] for r in runs)}
    return summary


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def _server(weights: Path, replicas: int, cores: str, env: dict[str, str]) -> Iterator[tuple[str, int]]:
    import httpx

    port = _free_port()
    cmd = _cpu_prefix(cores) + [sys.executable, "-m", "steadyclip", "serve", ARCH, "--pretrained", str(weights),
                                "--replicas", str(replicas), "--port", str(port), "--log-level", "warning",
                                "--max-images", "16"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}: {cmd}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("server not ready in 300 s")
            time.sleep(0.25)
        yield url, proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


def _memory(pid: int, weights_bytes: int) -> dict[str, Any]:
    root = psutil.Process(pid)
    kids = [p for p in root.children(recursive=True) if "zygote" not in " ".join(p.cmdline())]
    replicas = [p for p in kids if p.ppid() != pid]  # forked by the zygote
    uss = [p.memory_full_info().uss for p in replicas]
    return {"server_rss_mb": root.memory_info().rss / 2**20, "replica_uss_mb": [u / 2**20 for u in uss],
            "replica_uss_vs_weights": [u / weights_bytes for u in uss]}


def _servers(folder: Path, weights: Path, env: dict[str, str], requests: int, repeats: int) -> dict[str, Any]:
    """Each server layout ``repeats`` times, K=1 and K=CPUs alternating; the best run's req/s per layout.

    Memory is the largest USS seen over every run of a layout (the conservative figure for the goal).
    """
    from benchmarks.loadtest import run_loadtest

    image = min(folder.glob("*.jpg")).read_bytes()
    cpus = len(os.sched_getaffinity(0))
    runs: dict[str, list[dict[str, Any]]] = {}
    layouts = sorted({1, cpus})
    for cores in ("1", "all"):
        for rep in range(repeats):
            for k in layouts if rep % 2 == 0 else layouts[::-1]:
                with _server(weights, k, cores, env) as (url, pid):
                    load = run_loadtest(url, image, ["a cat", "a dog", "a car"], clients=16, requests=requests,
                                        max_seconds=300, warmup=2)
                    mem = _memory(pid, weights.stat().st_size)
                runs.setdefault(f"K={k}@{cores}", []).append(
                    {"rps": load["throughput_rps"], "latency_ms": load["latency_ms"],
                     "distinct_answers": load["distinct_answers"], "status": load.get("status_codes"), **mem})
    out: dict[str, Any] = {}
    for key, rs in runs.items():
        best = max(rs, key=lambda r: r["rps"])
        worst_uss = max(rs, key=lambda r: max(r["replica_uss_vs_weights"], default=0.0))
        out[key] = {**best, "rps_runs": [r["rps"] for r in rs],
                    "replica_uss_mb": worst_uss["replica_uss_mb"],
                    "replica_uss_vs_weights": worst_uss["replica_uss_vs_weights"]}
    return out


def _report(doc: dict[str, Any]) -> str:
    wp, srv, cpus = doc["whole_process"], doc["server"], doc["cpus"]
    lines = [f"# Scale benchmark ({doc['date']}, {doc['host']}, {cpus} CPUs: {doc['cpu_model']})", "",
             (f"{doc['images']} JPEGs (640x480..1600x1200), {ARCH} random init, whole processes, best of "
              f"{doc['repeats']}, alternating order."), "",
             "| job | 1 core (taskset -c 0) | all cores | 1 -> all | peak RSS tree / largest process |",
             "|---|---|---|---|---|"]
    for name in ("openclip_loop", "steadyclip_batch"):
        one, all_ = wp[f"{name}@1"], wp[f"{name}@all"]
        lines.append(f"| {name} | {one['best_wall_s']:.1f} s ({one['img_per_s']:.1f} img/s) | "
                     f"{all_['best_wall_s']:.1f} s ({all_['img_per_s']:.1f} img/s) | "
                     f"{one['best_wall_s'] / all_['best_wall_s']:.2f}x | "
                     f"{all_['peak_rss_tree_mb']:.0f} / {all_['peak_rss_process_mb']:.0f} MB |")
    lines += _stages(wp, cpus)
    lines += ["", *_goals(doc)]
    if not srv:
        return "\n".join(lines) + "\n"
    lines += ["", ("| server, 16 clients | req/s best (range) | p50 / p99 ms | server RSS "
                  "| USS per replica (x weights) |"),
              "|---|---|---|---|---|"]
    for key, s in srv.items():
        uss = ", ".join(f"{u:.0f} MB ({v:.1%})" for u, v in zip(s["replica_uss_mb"], s["replica_uss_vs_weights"]))
        runs = s.get("rps_runs", [s["rps"]])
        lines.append(f"| {key} | {s['rps']:.1f} ({min(runs):.1f}-{max(runs):.1f}) | "
                     f"{s['latency_ms']['p50']:.0f} / {s['latency_ms']['p99']:.0f} | "
                     f"{s['server_rss_mb']:.0f} MB | {uss or '-'} |")
    return "\n".join(lines) + "\n"


def _stages(wp: dict[str, Any], cpus: int) -> list[str]:
    """Where each job's time goes: serial start-up and exit vs the compute stage, and what that allows.

    Figures are those of each layout's best (fastest whole-process) run, the runs the 1 -> all ratio
    above compares. The ceiling is Amdahl's law on them: the whole-process 1 -> all ratio the job would
    reach if its compute stage ran ``cpus`` times faster on all cores, its start-up staying what it was.
    """
    if "startup_s" not in wp["steadyclip_batch@1"]:
        return []  # a results file from before the jobs reported their compute stage

    def best(key: str) -> tuple[float, float]:
        walls, startups = wp[key]["walls_s"], wp[key]["startup_s"]
        i = walls.index(min(walls))
        return startups[i], walls[i] - startups[i]

    lines = ["", ("| job | start-up + exit, 1 core / all | compute stage, 1 core / all | compute 1 -> all "
                 f"| whole 1 -> all, ceiling ({cpus}x compute) |"), "|---|---|---|---|---|"]
    for name in ("openclip_loop", "steadyclip_batch"):
        (s1, c1), (sa, ca) = best(f"{name}@1"), best(f"{name}@all")
        lines.append(f"| {name} | {s1:.1f} / {sa:.1f} s | {c1:.1f} / {ca:.1f} s | {c1 / ca:.2f}x | "
                     f"{(s1 + c1) / (sa + c1 / cpus):.2f}x |")
    return lines


def _goals(doc: dict[str, Any]) -> list[str]:
    """Issue 12's goals, each with the measured ratio and PASS/MISS."""
    wp, srv, cpus = doc["whole_process"], doc["server"], doc["cpus"]

    def wall(key: str) -> float:
        return float(wp[key]["best_wall_s"])

    rows = [(f"batch vs loop at {c} core(s)", wall(f"openclip_loop@{c}") / wall(f"steadyclip_batch@{c}"), 1.0)
            for c in ("1", "all")]
    rows.append(("batch 1 -> all cores", wall("steadyclip_batch@1") / wall("steadyclip_batch@all"), 1.7))
    if f"K={cpus}@all" in srv and cpus > 1:
        rows.append((f"server K={cpus} vs K=1 (all cores)", srv[f"K={cpus}@all"]["rps"] / srv["K=1@all"]["rps"], 1.6))
    uss = [v for s in srv.values() for v in s["replica_uss_vs_weights"]]
    out = ["| goal | measured | target | |", "|---|---|---|---|"]
    out += [f"| {name} | {r:.2f}x | >= {t}x | {'PASS' if r >= t else 'MISS'} |" for name, r, t in rows]
    if uss:
        out.append(f"| USS per extra replica | {max(uss):.1%} of weights | <= 15% | {'PASS' if max(uss) <= 0.15 else 'MISS'} |")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--images", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--no-server", action="store_true", help="whole-process jobs only (e.g. at a larger --images)")
    args = ap.parse_args(argv)
    n = args.images or (24 if args.quick else 192)
    repeats = args.repeats or (1 if args.quick else 2)
    with tempfile.TemporaryDirectory(prefix="steadyclip-scale-") as tmp:
        work = Path(tmp)
        folder, weights = _prep(work, n)
        env = dict(os.environ, STEADYCLIP_CACHE_DIR=str(work / "cache"), PYTHONPATH=str(REPO / "src"))
        doc: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "host": socket.gethostname(), "images": n,
                               "repeats": repeats, "cpus": len(os.sched_getaffinity(0)),
                               "cpu_model": _cpu_model()}
        doc["whole_process"] = _whole_process(folder, weights, work, env, repeats)
        doc["server"] = {} if args.no_server else _servers(folder, weights, env, 32 if args.quick else 96, repeats)
    kind = "quick" if args.quick else "vm" if n == 192 else f"vm-{n}"
    out = REPO / "benchmarks" / "results" / f"{doc['date']}-{kind}-scale"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(doc, indent=2, sort_keys=True))
    text = _report(doc)
    out.with_suffix(".md").write_text(text)
    print(text)
    return 0


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown"


if __name__ == "__main__":
    raise SystemExit(main())
