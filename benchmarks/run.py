"""steadyclip vs its peers, side by side in one run: throughput, start-up, caching, memory, stability.

    python -m benchmarks.run            # the full run (`make bench`), ~15 min on a 2-vCPU box
    python -m benchmarks.run --quick    # a smoke run (< 3 min) that checks the script works

Writes ``benchmarks/results/<date>-<host>.{json,md,png}`` and prints the goals
with PASS/MISS. Every figure is measured in this run; weights are random-init
(no model hub is reachable), which changes no timing. See README "Benchmarks".
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from benchmarks import report
from benchmarks.harness import REPO, Harness, TaskError

DEMO = "steadyclip-shapes"
PEERS_AND_US = ("openclip-best", "steadyclip-strict", "openclip-readme", "hf-transformers", "steadyclip-fast",
                "steadyclip-strict-onednn", "steadyclip-fast-emulated", "openclip-bf16")
# open_clip fp32, strict and fast side by side (issue 15), plus the forced-emulated and open_clip bf16 references
FAST_ROWS = ("steadyclip-fast", "steadyclip-fast-emulated", "openclip-bf16")


@dataclasses.dataclass(frozen=True)
class Plan:
    """How much of everything to run; ``--quick`` shrinks it."""

    threads: int = 1
    micro_batch: int = 8
    images: dict[str, int] = dataclasses.field(
        default_factory=lambda: {"ViT-B-32": 48, "RN50": 16, DEMO: 48})
    # arch -> names (default: all). ViT-B-32 has one convolution (the patch embedding): no oneDNN variant.
    contenders: dict[str, tuple[str, ...]] = dataclasses.field(
        default_factory=lambda: {"ViT-B-32": (*PEERS_AND_US[:5], *FAST_ROWS[1:]),
                                 # RN50's forced-emulated bf16 rows are left out: emulated bf16 convolutions ran
                                 # 0.12 img/s vs 2.57 fp32 here (EPYC), 20+ min of a run for a known answer.
                                 "RN50": ("openclip-best", "steadyclip-strict", "openclip-readme",
                                          "steadyclip-strict-onednn", "steadyclip-fast")})
    repeats_model: int = 2
    repeats_e2e: int = 1
    probe_arch: str = "ViT-B-32"  # start-up and batch-job figures
    textcache: tuple[tuple[str, int], ...] = ((DEMO, 1000), ("ViT-B-32", 4))  # (arch, labels) x 80 templates
    stability_runs: int = 10
    stability_images: int = 8  # the red circle + the first 7 benchmark photos
    careless_processes: int = 5
    server_requests: int = 200
    server_clients: int = 16
    profile_pair_budget_s: float = 20.0  # per paired comparison
    profile_reps: int = 3
    profile_archs: tuple[str, ...] = ("ViT-B-32", "RN50", DEMO)
    gemm_envs: tuple[str, ...] = ("plain", "mkl_cbwr_strict")
    pair_rounds: int = 2  # ViT-B-32: (2) and (4) each run in 2 processes, order B S ... S B
    quick: bool = False
    hf: bool = True  # the Hugging Face peer (needs `transformers`, the bench extra)

    @classmethod
    def quick_plan(cls, threads: int, micro_batch: int) -> Plan:
        """Every code path once, on small inputs; the heavy ViT-B-32 only where nothing else will do."""
        return cls(threads=threads, micro_batch=micro_batch, images={"ViT-B-32": 8, DEMO: 16},
                   contenders={"ViT-B-32": ("openclip-best", "steadyclip-strict", "hf-transformers", *FAST_ROWS)},
                   repeats_model=1, probe_arch=DEMO, textcache=((DEMO, 50),), careless_processes=2,
                   server_requests=32, profile_pair_budget_s=2.0, profile_reps=1, profile_archs=(DEMO,),
                   gemm_envs=("plain",), pair_rounds=1, quick=True)

    def contenders_for(self, arch: str) -> list[str]:
        """Hugging Face has no RN50 or demo-architecture CLIP: it runs on ViT-B-32 only."""
        names = self.contenders.get(arch, PEERS_AND_US)
        return [c for c in names if c != "hf-transformers" or (arch == "ViT-B-32" and self.hf)]


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """One contender measured in two processes: best-of over all passes, worst peak RSS, both kept."""
    merged = dict(b)
    for kind in ("model_only", "e2e"):
        times = a[kind]["times_s"] + b[kind]["times_s"]
        merged[kind] = {"best_ips": max(a[kind]["best_ips"], b[kind]["best_ips"]),
                        "median_ips": a["images"] / statistics.median(times), "times_s": times}
    merged["process"] = dict(b["process"], peak_rss_mb=max(a["process"]["peak_rss_mb"], b["process"]["peak_rss_mb"]))
    merged["load_s"] = min(a["load_s"], b["load_s"])
    merged["repeat_identical"] = a["repeat_identical"] and b["repeat_identical"]
    merged["processes"] = a.get("processes", 1) + 1
    merged["runs"] = [*a.get("runs", [{k: a[k] for k in ("model_only", "e2e", "load_s", "process")}]),
                      {k: b[k] for k in ("model_only", "e2e", "load_s", "process")}]
    return merged


class Run:
    """One benchmark run: its plan, harness, and the results collected so far."""

    def __init__(self, plan: Plan, harness: Harness) -> None:
        self.plan, self.h = plan, harness
        self.results: dict[str, Any] = {"errors": {}}
        self.prep: dict[str, Any] = {}

    def section(self, name: str, fn: Callable[[], Any]) -> None:
        """Run one section; an error is recorded (and reported as not measured), not fatal."""
        self.h.log(f"== {name}")
        try:
            self.results[name] = fn()
        except (TaskError, OSError, RuntimeError, ValueError, KeyError) as e:
            self.h.log(f"!! {name} failed: {e}")
            self.results["errors"][name] = str(e)

    def arch(self, arch: str) -> dict[str, Any]:
        a: dict[str, Any] = self.prep["archs"][arch]
        return a

    def steady_spec(self, arch: str) -> dict[str, Any]:
        a = self.arch(arch)
        return {"arch": arch, "weights": a["weights"], "bundled": a.get("demo_weights") == "bundled",
                "uses_steadyclip": True}

    # ---- sections -------------------------------------------------------------------------
    def do_prep(self) -> dict[str, Any]:
        spec = {"work_dir": str(self.h.work), "n_images": max(self.plan.images.values()),
                "archs": self.plan.images, "hf": "ViT-B-32" in self.plan.images and self.plan.hf, "seed": 0}
        self.prep = self.h.run("prep", "prep", spec, timeout_s=600)
        self.h.log(f"images: {self.prep['images']}")
        return {k: v for k, v in self.prep.items() if k != "image_paths"}

    def do_gemm(self, when: str = "start") -> dict[str, Any]:
        out = {}
        envs: dict[str, dict[str, str]] = {"plain": {}, "mkl_cbwr_strict": {"MKL_CBWR": "AUTO,STRICT"}}
        labels = self.plan.gemm_envs if when == "start" else ("plain",)
        for label in labels:
            r = self.h.run("gemm", f"gemm-{label}-{when}", {"n": 2048, "reps": 15}, env_extra=envs[label])
            out[label if when == "start" else f"{label}_{when}"] = r
            self.h.log(f"GEMM peak ({label}, {when}): fp32 {r['fp32_gflops']:.1f} GFLOP/s, bf16 {r['bf16_gflops']:.1f}")
        return out

    def do_contenders(self, arch: str) -> dict[str, Any]:
        """Each contender in its own process; on the reference arch the (2)/(4) pair runs twice, B S ... S B."""
        names = self.plan.contenders_for(arch)
        order: list[str] = list(names)
        pair: list[str] = [c for c in ("openclip-best", "steadyclip-strict") if c in names]
        if arch == "ViT-B-32" and self.plan.pair_rounds > 1 and len(pair) == 2:
            order = pair + [c for c in names if c not in pair] + pair[::-1]
        out: dict[str, Any] = {}
        for i, name in enumerate(order):
            try:
                r = self._contender(arch, name, f"{arch}-{name}-{i}")
            except TaskError as e:
                self.h.log(f"!! {arch} {name}: {e}")
                self.results["errors"][f"{arch}/{name}"] = str(e)
                continue
            out[name] = _merge(out[name], r) if name in out and "not_run" not in r else r
        report.add_agreement(out, self.h.work / "out", arch)
        return out

    def _contender(self, arch: str, name: str, label: str) -> dict[str, Any]:
        a = self.arch(arch)
        n = self.plan.images[arch]
        spec = {"contender": name, "arch": arch, "weights": a["weights"], "hf_dir": self.prep.get("hf", {}).get("dir"),
                "bundled": a.get("demo_weights") == "bundled", "paths": self.prep["image_paths"][:n],
                "pixels": a["pixels"], "micro_batch": self.plan.micro_batch,
                "repeats_model": self.plan.repeats_model, "repeats_e2e": self.plan.repeats_e2e,
                "emb_out": str(self.h.work / "out" / f"emb-{arch}-{name}.npy"),
                "uses_steadyclip": name.startswith("steadyclip")}
        r = self.h.run("contender", label, spec)
        if "not_run" in r:
            self.h.log(f"{arch:18s} {name:18s} not run: {r['not_run'][:160]}")
            return r
        self.h.log(f"{arch:18s} {name:18s} model-only {r['model_only']['best_ips']:7.2f} img/s  "
                   f"e2e {r['e2e']['best_ips']:7.2f} img/s  peak RSS {r['process']['peak_rss_mb']:.0f} MB")
        return r

    def do_profile(self, arch: str) -> dict[str, Any]:
        a = self.arch(arch)
        spec = {**self.steady_spec(arch), "pixels": a["pixels"], "micro_batch": self.plan.micro_batch,
                "pair_budget_s": self.plan.profile_pair_budget_s, "reps": self.plan.profile_reps,
                "bf16": arch in ("ViT-B-32", DEMO)}
        # A fresh cache dir: the engine's batch self-checks really run (and are timed) here.
        r = self.h.run("profile", f"profile-{arch}", spec, cache=f"profile-{arch}")
        self.h.log(f"profile {arch}: engine speed {r['ab']['engine_speed_ratio']:.3f}x of bare ({r['ab']['pairs']} "
                   f"pairs), strict flags x{r['costs']['strict_flags_slowdown']:.3f} per forward")
        return r

    def do_startup(self) -> dict[str, Any]:
        arch = self.plan.probe_arch
        a = self.arch(arch)
        image = self.prep["image_paths"][0]
        labels = ["a cat", "a dog", "a diagram"]
        out: dict[str, Any] = {"arch": arch, "weights_mb": a["weights_mb"]}
        for phase in ("cold", "warm"):
            for kind in ("open_clip", "steadyclip"):
                if phase == "cold":
                    shutil.rmtree(self.h.work / "caches" / "startup", ignore_errors=True)
                    out[f"{phase}_page_cache_evicted"] = self.h.evict(a["weights"])
                spec = {**self.steady_spec(arch), "kind": kind, "image": image, "labels": labels,
                        "uses_steadyclip": kind == "steadyclip"}
                r = self.h.run("startup", f"startup-{phase}-{kind}", spec, cache="startup")
                r["time_to_first_result_s"] = r["first_result_wall"] - r["parent"]["start_wall"]
                out[f"{kind}_{phase}"] = r
                self.h.log(f"start-up {phase:4s} {kind:10s}: first result after {r['time_to_first_result_s']:.2f}s"
                           + (f" (hash cache hits {r['hash_cache_hits']}, misses {r['hash_cache_misses']})"
                              if kind == "steadyclip" else ""))
        return out

    def do_textcache(self, arch: str, n_labels: int) -> dict[str, Any]:
        cache_path = self.h.work / "caches" / f"text-{arch}.sqlite3"
        cache_path.unlink(missing_ok=True)
        spec = {**self.steady_spec(arch), "n_labels": n_labels, "templates": "openai-imagenet",
                "cache_path": str(cache_path)}
        r = self.h.run("textcache", f"textcache-{arch}", spec)
        self.h.log(f"text cache {arch} {r['labels']}x{r['templates']}: miss {r['miss_s']:.2f}s, "
                   f"hit {r['hit_s'] * 1000:.1f} ms -> x{r['speedup']:.0f}")
        return r

    def do_stability(self) -> dict[str, Any]:
        """The symptom on the demo model: a clean in-distribution shape plus photo-like images it is unsure of."""
        a = self.arch(DEMO)
        images = [self.prep["shape_image"], *self.prep["image_paths"][: self.plan.stability_images - 1]]
        spec = {**self.steady_spec(DEMO), "images": images, "runs": self.plan.stability_runs, "weights": a["weights"]}
        r = self.h.run("stability", "stability", spec)
        procs = [self.h.run("careless", f"careless-{i}", spec)["probs"] for i in range(self.plan.careless_processes)]
        r["careless_fresh_processes"] = [report.spread([p[i] for p in procs]) for i in range(len(images))]
        for key in ("careless_open_clip", "careless_fresh_processes", "steadyclip_strict"):
            r[f"{key}_max_spread"] = max(x["max_spread"] for x in r[key])
        self.h.log(f"stability: careless in-process max spread {r['careless_open_clip_max_spread']:.4f}, "
                   f"fresh processes {r['careless_fresh_processes_max_spread']:.4f}, "
                   f"steadyclip {r['steadyclip_strict_max_spread']}")
        return r

    def do_batch(self) -> dict[str, Any]:
        arch = self.plan.probe_arch
        spec = {**self.steady_spec(arch), "micro_batch": self.plan.micro_batch,
                "paths": self.prep["image_paths"][: self.plan.images[arch]]}
        r = self.h.run("batch", f"batch-{arch}", spec)
        self.h.log(f"batch job: {r['batch_items_per_s']:.2f} img/s vs model-only {r['model_items_per_s']:.2f} "
                   f"(ratio {r['ratio']:.2f}, {r['workers']} decoder process(es))")
        return r

    def do_texts(self) -> dict[str, Any]:
        """Text throughput beside images: open_clip's encode_text (32 x 77 tokens) vs steadyclip strict
        (sequence-length buckets), model-only, one process each at the plan's threads."""
        from benchmarks.texts import model_only

        arch = "ViT-B-32" if "ViT-B-32" in self.plan.images else DEMO
        a = self.arch(arch)
        weights = "" if a.get("demo_weights") == "bundled" else a["weights"]
        model = "steadyclip-demo" if arch == DEMO and not weights else arch
        n = 64 if self.plan.quick else 256
        kinds = ({} if arch == DEMO else {"openclip": "openclip"}) | {
            "steadyclip_full": "steadyclip-full", "steadyclip_buckets": "steadyclip"}
        r: dict[str, Any] = {"arch": arch, "texts": n,
                             **{k: model_only(v, model, weights, self.plan.threads, n) for k, v in kinds.items()}}
        self.h.log("texts model-only: " + ", ".join(f"{k} {v:.1f}/s" for k, v in r.items()
                                                     if isinstance(v, float)))
        return r

    def do_server(self) -> dict[str, Any]:
        from benchmarks.loadtest import run_loadtest, spawned_server

        a = self.arch(DEMO)
        model_args = [] if a.get("demo_weights") == "bundled" else [DEMO, "--pretrained", a["weights"]]
        args = [*model_args, "--threads", str(self.plan.threads), "--micro-batch", str(self.plan.micro_batch)]
        image = Path(self.prep["image_paths"][0]).read_bytes()
        labels = ["red circle", "blue square", "green triangle", "yellow star", "purple cross", "orange ring"]
        log = self.h.work / "logs" / "server.log"
        with spawned_server(*args, env=self.h.env("server"), log_path=log) as url:
            r = run_loadtest(url, image, labels, clients=self.plan.server_clients,
                             requests=self.plan.server_requests, max_seconds=120.0)
        r.update({"model": DEMO, "serve_args": args, "image_bytes": len(image)})
        self.h.log(f"server: {r['throughput_rps']} req/s, p99 {r['latency_ms']['p99']} ms, ok {r['ok']}/{r['sent']}, "
                   f"distinct answers {r['distinct_answers']}")
        return r


def _machine(plan: Plan) -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    cpu = "unknown"
    with contextlib.suppress(OSError):
        cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                    if ln.startswith("model name")), cpu)
    versions: dict[str, str | None] = {}
    for pkg in ("torch", "open_clip_torch", "transformers", "timm", "numpy", "pillow", "steadyclip"):
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            versions[pkg] = None
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "threads": plan.threads, "micro_batch": plan.micro_batch,
            "python": sys.version.split()[0], "versions": versions, "loadavg_start": os.getloadavg()}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small smoke run (< 3 min) to check the script works")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads for every contender (default 1)")
    p.add_argument("--micro-batch", type=int, default=8, help="steadyclip's micro-batch = the peers' batch size")
    p.add_argument("--vit-images", type=int, help="images for ViT-B-32 (default 48; quick 8)")
    p.add_argument("--rn50-images", type=int, help="images for RN50 (default 24; 0 skips RN50)")
    p.add_argument("--demo-images", type=int, help="images for the bundled demo model (default 48)")
    p.add_argument("--text-labels-demo", type=int, help="labels x 80 templates on the demo model (default 1000)")
    p.add_argument("--text-labels-vit", type=int, help="labels x 80 templates on ViT-B-32 (default 4; 0 skips)")
    p.add_argument("--no-hf", action="store_true", help="leave out the Hugging Face peer (no `transformers`)")
    p.add_argument("--server-requests", type=int, help="load-test requests (default 200)")
    p.add_argument("--only", help="comma-separated sections (gemm,contenders,profile,startup,textcache,"
                                  "stability,batch,texts,server); prep always runs")
    p.add_argument("--out-dir", type=Path, help="where results go (default benchmarks/results; --quick/--only: a temp dir)")
    p.add_argument("--work-dir", type=Path, help="keep weights/images here (default: a temp dir, deleted)")
    return p.parse_args(argv)


def build_plan(args: argparse.Namespace) -> Plan:
    plan = Plan.quick_plan(args.threads, args.micro_batch) if args.quick else Plan(threads=args.threads,
                                                                                   micro_batch=args.micro_batch)
    images = dict(plan.images)
    for arch, value in (("ViT-B-32", args.vit_images), ("RN50", args.rn50_images), (DEMO, args.demo_images)):
        if value is not None:
            images[arch] = value
    images = {k: v for k, v in images.items() if v > 0}
    if "ViT-B-32" not in images or DEMO not in images:
        raise SystemExit("ViT-B-32 (the reference) and the demo model are required; give them > 0 images")
    changes: dict[str, Any] = {"images": images, "hf": not args.no_hf}
    if args.server_requests is not None:
        changes["server_requests"] = args.server_requests
    text = dict(plan.textcache)
    for arch, value in ((DEMO, args.text_labels_demo), ("ViT-B-32", args.text_labels_vit)):
        if value is not None:
            text[arch] = value
    changes["textcache"] = tuple((a, n) for a, n in text.items() if n > 0)
    changes["profile_archs"] = tuple(a for a in plan.profile_archs if a in images)
    return dataclasses.replace(plan, **changes)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    plan = build_plan(args)
    only = set(args.only.split(",")) if args.only else None
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="steadyclip-bench-"))
    h = Harness(work, plan.threads)
    run = Run(plan, h)
    started = time.time()
    run.results["machine"] = _machine(plan)
    run.results["plan"] = dataclasses.asdict(plan)
    run.results["command"] = " ".join(["python -m benchmarks.run", *(sys.argv[1:] if argv is None else argv)])
    h.log(f"work dir {work}; threads {plan.threads}; micro-batch {plan.micro_batch}; quick={plan.quick}")
    try:
        run.section("prep", run.do_prep)
        if "prep" in run.results["errors"]:
            return 1

        def want(name: str) -> bool:
            return only is None or name in only

        if want("gemm"):
            run.section("gemm", run.do_gemm)
        if want("contenders"):
            for arch in plan.images:
                run.section(f"contenders/{arch}", lambda arch=arch: run.do_contenders(arch))  # type: ignore[misc]
        if want("profile"):
            for arch in plan.profile_archs:
                run.section(f"profile/{arch}", lambda arch=arch: run.do_profile(arch))  # type: ignore[misc]
        if want("startup"):
            run.section("startup", run.do_startup)
        if want("textcache"):
            for arch, n in plan.textcache:
                run.section(f"textcache/{arch}", lambda arch=arch, n=n: run.do_textcache(arch, n))  # type: ignore[misc]
        if want("stability"):
            run.section("stability", run.do_stability)
        if want("batch"):
            run.section("batch", run.do_batch)
        if want("texts"):
            run.section("texts", run.do_texts)
        if want("server"):
            run.section("server", run.do_server)
        if want("gemm"):
            run.section("gemm_end", lambda: run.do_gemm("end"))
    finally:
        run.results["machine"]["loadavg_end"] = os.getloadavg()
        run.results["total_s"] = time.time() - started
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    partial = plan.quick or only is not None
    out_dir = args.out_dir or (Path(tempfile.gettempdir()) / "steadyclip-bench-partial" if partial
                               else REPO / "benchmarks" / "results")
    paths = report.write_all(run.results, out_dir, partial=partial)
    goals = report.goals(run.results)
    print(report.goals_text(goals))
    for p in paths:
        print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
