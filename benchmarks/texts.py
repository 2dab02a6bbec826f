"""Texts side by side: the server's texts/s against the engine's own model-only text rate.

    python -m benchmarks.texts              # ViT-B-32 (random init), 4 and 16 clients, ~4 min on 2 vCPUs
    python -m benchmarks.texts --quick      # the demo model, a smoke run

In one run, each in its own process so neither warms the other:
(a) model-only, 1 process at ``--threads``: open_clip's ``encode_text`` batched at 32 x 77 tokens (what a
    user's loop does), steadyclip strict with text buckets (the default), and steadyclip strict with
    ``text_buckets="full"`` (every text at 77 tokens, 32 rows: the shapes before buckets);
(b) ``steadyclip serve`` with its defaults (one replica per usable CPU), ``/v1/embeddings`` requests of 8
    short texts (3-8 tokens) from 4 and 16 clients: texts/s, p50/p99, errors, and whether every answer
    to the same request was identical.
Infinity is not installed here: its figures (50-83 texts/s at 4-16 clients, 8 texts per request, the
same weights, on this project's 2-vCPU machines) are quoted from DESIGN.md, not measured in this run.
Writes ``benchmarks/results/<date>-<host>-texts.{json,md}``.
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
QUERIES = ("a photo of a cat", "red circle", "a dog on the beach", "blue square", "green star on white",
           "a person riding a bike", "sunset over the sea", "two birds in a tree")
INFINITY_TEXTS_PER_S = (50.0, 83.0)  # DESIGN.md: Infinity 0.0.78, ViT-B-32, 4-16 clients, 8 texts per request


def _texts(n: int) -> list[str]:
    """``n`` short query-like texts (3-8 tokens), all different."""
    return [f"{QUERIES[i % len(QUERIES)]} {i}" for i in range(n)]


_MODEL_ONLY = r"""
import json, sys, time, torch
kind, model, pretrained, threads, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
torch.set_num_threads(threads)
sys.path.insert(0, sys.argv[6])
from benchmarks.texts import _texts
texts = _texts(n)
if kind == "openclip":
    import open_clip
    m, _, _ = open_clip.create_model_and_transforms(model, pretrained=pretrained or None)
    m.eval(); tok = open_clip.get_tokenizer(model)
    def run():
        with torch.inference_mode():
            for s in range(0, n, 32):
                m.encode_text(tok(texts[s:s + 32]))
else:
    import steadyclip
    loaded = steadyclip.load(model, pretrained=pretrained or None)
    kw = {"text_buckets": "full", "text_micro_batch": 32} if kind == "steadyclip-full" else {}
    eng = steadyclip.Engine(loaded, threads=threads, replicas=1, text_cache=None, **kw)
    def run():
        eng.embed_texts(texts)
run()
best = 0.0
for _ in range(3):
    t0 = time.perf_counter(); run(); best = max(best, n / (time.perf_counter() - t0))
print(json.dumps({"texts_per_s": best}))
"""


def model_only(kind: str, model: str, pretrained: str, threads: int, n: int) -> float:
    """Best-of-3 texts/s of one contender, in a fresh process."""
    out = subprocess.run([sys.executable, "-c", _MODEL_ONLY, kind, model, pretrained, str(threads), str(n), str(REPO)],
                         capture_output=True, text=True, check=True, cwd=REPO)
    return float(json.loads(out.stdout.strip().splitlines()[-1])["texts_per_s"])


def server(model: str, pretrained: str, clients: Sequence[int], requests: int, seconds: float) -> list[dict[str, Any]]:
    """``steadyclip serve`` with its defaults under ``/v1/embeddings`` load, one run per client count."""
    from benchmarks.loadtest import run_loadtest, spawned_server

    args = [model] + (["--pretrained", pretrained] if pretrained else [])
    out = []
    with spawned_server(*args, ready_timeout_s=600) as url:
        for c in clients:
            r = run_loadtest(url, None, [], clients=c, requests=requests, max_seconds=seconds,
                             texts=list(QUERIES), warmup=4)
            out.append({"clients": c, "texts_per_s": r["texts_per_s"], "latency_ms": r["latency_ms"],
                        "status_counts": r["status_counts"], "distinct_answers": r["distinct_answers"],
                        "rows_per_forward": r["batching"].get("rows_per_forward")})
    return out


def _report(doc: dict[str, Any]) -> str:
    mo = doc["model_only"]
    lines = [f"# Texts: server vs model-only ({doc['model']})", "",
             (f"Command: `python -m benchmarks.texts{' --quick' if doc['quick'] else ''}`. CPU: {doc['cpu']}, "
             f"{doc['cpus']} usable CPUs; model-only at {doc['threads']} thread(s), one process each; the server "
             "with its defaults (one replica per usable CPU). Texts: short queries (3-8 tokens)."), "",
             f"| model-only | texts/s | x {next(iter(mo))} |", "|---|---|---|"]
    ref = next(iter(mo.values()))
    for name, v in mo.items():
        lines.append(f"| {name} | {v:.1f} | {v / ref:.2f}x |")
    lines += ["", ("| server, /v1/embeddings, 8 texts/request | texts/s | p50 ms | p99 ms | statuses | distinct answers "
              "| x Infinity (50-83, DESIGN.md) |"), "|---|---|---|---|---|---|---|"]
    lo, hi = INFINITY_TEXTS_PER_S
    for r in doc["server"]:
        t = r["texts_per_s"] or 0.0
        lines.append(f"| {r['clients']} clients | {t:.1f} | {r['latency_ms']['p50']} | {r['latency_ms']['p99']} | "
                     f"{r['status_counts']} | {r['distinct_answers']} | {t / hi:.2f}-{t / lo:.2f}x |")
    lines += ["", f"Goal (issue 25): server texts >= 1.5x Infinity (>= {1.5 * hi:.0f} texts/s against its best "
              "figure) at 4 and 16 clients, 0 errors: " + ", ".join(
                  f"{r['clients']} clients {'PASS' if (r['texts_per_s'] or 0) >= 1.5 * hi and set(r['status_counts']) == {'200'} else 'MISS'}"
                  for r in doc["server"])]
    return "\n".join(lines) + "\n"


def _cpu() -> str:
    from steadyclip.numerics.cpuid import cpu_facts

    return str(cpu_facts().get("cpu_model") or "unknown")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out-dir", type=Path, default=REPO / "benchmarks" / "results")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        if args.quick:
            model, pretrained, n = "steadyclip-demo", "", 64
        else:
            import open_clip
            import torch
            from safetensors.torch import save_file

            torch.manual_seed(0)
            weights = Path(tmp) / "vit-b-32.safetensors"
            state = open_clip.create_model("ViT-B-32").state_dict()
            save_file({k: v.detach().clone().contiguous() for k, v in state.items()}, str(weights))
            model, pretrained, n = "ViT-B-32", str(weights), 256
        # the first row is the reference; open_clip cannot build the demo architecture by name (--quick)
        names = {"openclip (32 x 77 tokens)": "openclip"} if not args.quick else {}
        names |= {"steadyclip strict (text_buckets='full', 32 x 77)": "steadyclip-full",
                  "steadyclip strict (buckets)": "steadyclip"}
        mo = {label: model_only(kind, model, pretrained, args.threads, n) for label, kind in names.items()}
        srv = server(model, pretrained, (4, 16), 60 if args.quick else 600, 20 if args.quick else 60)
    doc = {"model": model, "quick": args.quick, "threads": args.threads, "cpu": _cpu(),
           "cpus": len(os.sched_getaffinity(0)), "host": socket.gethostname(), "date": time.strftime("%Y-%m-%d"),
           "model_only": mo, "server": srv}
    text = _report(doc)
    print(text)
    if not args.quick:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        stem = args.out_dir / f"{doc['date']}-vm-texts"
        stem.with_suffix(".json").write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
        stem.with_suffix(".md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
