"""Texts side by side: the server's texts/s against the engine's own model-only text rate.

    python -m benchmarks.texts              # ViT-B-32 (random init), 4 and 16 clients, ~4 min on 2 vCPUs
    python -m benchmarks.texts --infinity .venv-infinity   # + Infinity on the same weights (make bench-infinity),
                                            # ~8 min (its start-up, torch.compile included, ~1-1.5 min)
    python -m benchmarks.texts --quick      # the demo model, a smoke run (no Infinity)

In one run, each in its own process so neither warms the other:
(a) model-only, 1 process at ``--threads``: open_clip's ``encode_text`` batched at 32 x 77 tokens (what a
    user's loop does), steadyclip strict with text buckets (the default), and steadyclip strict with
    ``text_buckets="full"`` (every text at 77 tokens, 32 rows: the shapes before buckets);
(b) ``steadyclip serve`` with its defaults (one replica per usable CPU), ``/v1/embeddings`` requests of 8
    short texts (3-8 tokens) from 4 and 16 clients: texts/s, p50/p99, errors, and whether every answer
    to the same request was identical;
(c) Infinity 0.0.78 (``--infinity VENV``, by default ``.venv-infinity`` when it exists), after (b) has
    stopped, never at the same time: the same weights converted to a transformers CLIP directory
    (``benchmarks.infinity``: token ids and features checked against open_clip first), its defaults, and
    the same load client, texts, client counts, request counts and time limits as (b). The report gives
    both and the measured ratio. Without Infinity the report says so and quotes DESIGN.md's 50-83 texts/s.
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

from benchmarks.infinity import VERSION as INFINITY_VERSION

REPO = Path(__file__).resolve().parent.parent
QUERIES = ("a photo of a cat", "red circle", "a dog on the beach", "blue square", "green star on white",
           "a person riding a bike", "sunset over the sea", "two birds in a tree")
# Quoted only when Infinity is not run: DESIGN.md's Infinity 0.0.78, ViT-B-32, 4-16 clients, 8 texts per request
INFINITY_TEXTS_PER_S = (50.0, 83.0)
CLIENTS = (4, 16)


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


def _rows(url: str, clients: Sequence[int], requests: int, seconds: float) -> list[dict[str, Any]]:
    """The load both servers get: ``/v1/embeddings`` of the 8 ``QUERIES``, one run per client count."""
    from benchmarks.loadtest import run_loadtest

    out = []
    for c in clients:
        r = run_loadtest(url, None, [], clients=c, requests=requests, max_seconds=seconds, texts=list(QUERIES),
                         warmup=4)
        out.append({"clients": c, "texts_per_s": r["texts_per_s"], "latency_ms": r["latency_ms"],
                    "status_counts": r["status_counts"], "distinct_answers": r["distinct_answers"],
                    "rows_per_forward": r["batching"].get("rows_per_forward"), "sent": r["sent"],
                    "duration_s": r["duration_s"], "stopped_by_time_limit": r["stopped_by_time_limit"]})
    return out


def server(model: str, pretrained: str, clients: Sequence[int], requests: int, seconds: float) -> list[dict[str, Any]]:
    """``steadyclip serve`` with its defaults under ``/v1/embeddings`` load, one run per client count."""
    from benchmarks.loadtest import spawned_server

    args = [model] + (["--pretrained", pretrained] if pretrained else [])
    with spawned_server(*args, ready_timeout_s=600) as url:
        return _rows(url, clients, requests, seconds)


CHECK_TEXTS = (*QUERIES, "A Photo of TWO Cats!!", "it's 3:15pm, isn't it?", "café naïve résumé 123456")


def infinity(venv: Path, state: dict[str, Any], work: Path, clients: Sequence[int], requests: int,
             seconds: float) -> dict[str, Any]:
    """Infinity on ``state`` (converted, then checked against open_clip) under the same load as :func:`server`."""
    from benchmarks import infinity as inf

    model_dir = inf.write_hf_clip(state, work / "hf-clip")
    reference = inf.openclip_features(state, CHECK_TEXTS)
    check = inf.finish_and_check(venv, model_dir, reference, CHECK_TEXTS)
    if not check["token_ids_equal"] or min(check["text_min_cosine"], check["image_min_cosine"]) < 0.999:
        raise RuntimeError(f"the converted model is not open_clip's: {check}")
    doc: dict[str, Any] = {"venv": str(venv), "pip": " ".join(inf.PIP_INSTALL), "check": check,
                           "command": " ".join(["infinity_emb", "v2", "--model-id", "DIR", "--port", "PORT",
                                                *inf.FLAGS])}
    t0 = time.perf_counter()
    with inf.spawned_infinity(venv, model_dir, log_path=work / "infinity.log") as url:
        doc["ready_s"] = round(time.perf_counter() - t0, 1)
        got = inf.embed(url, QUERIES)
        doc["served_min_cosine"] = min(inf.cosines(reference["text"][:len(QUERIES)], got))
        doc["server"] = _rows(url, clients, requests, seconds)
        # loadtest hashes whole bodies; Infinity's carry a fresh id each: count distinct embeddings instead
        for r in doc["server"]:
            probe = inf.distinct_embeddings(url, QUERIES, r["clients"], 4 * r["clients"])
            r["distinct_embeddings"] = probe["distinct"]
            r["distinct_probe_requests"] = probe["requests"]
    return doc


def _goal(srv: list[dict[str, Any]], inf_rows: list[dict[str, Any]] | None) -> str:
    """Issue 25's goal line, against the measured Infinity rows, else against DESIGN.md's best figure."""
    hi = INFINITY_TEXTS_PER_S[1]
    ref = {r["clients"]: r["texts_per_s"] or 0.0 for r in inf_rows} if inf_rows else {}
    verdicts = []
    for r in srv:
        if inf_rows and not ref[r["clients"]]:
            verdicts.append(f"{r['clients']} clients n/a (Infinity answered no request)")
            continue
        floor = 1.5 * ref[r["clients"]] if inf_rows else 1.5 * hi
        ok = (r["texts_per_s"] or 0.0) >= floor and set(r["status_counts"]) == {"200"}
        verdicts.append(f"{r['clients']} clients {'PASS' if ok else 'MISS'} (>= {floor:.0f} texts/s)")
    against = ("Infinity as measured in this run" if inf_rows else
               f"Infinity's best DESIGN.md figure, {hi:.0f} texts/s, NOT measured in this run")
    return f"Goal (issue 25): server texts >= 1.5x Infinity at 4 and 16 clients, 0 errors; against {against}: " + \
        ", ".join(verdicts)


def _server_rows(doc: dict[str, Any]) -> list[str]:
    inf_rows = (doc.get("infinity") or {}).get("server")
    lines = ["| /v1/embeddings, 8 texts/request | texts/s | p50 ms | p99 ms | statuses | distinct answers |",
             "|---|---|---|---|---|---|"]
    for name, rows in (("steadyclip serve", doc["server"]), (f"Infinity {INFINITY_VERSION}", inf_rows or [])):
        for r in rows:
            distinct = (f"{r['distinct_embeddings']} (embeddings, {r['distinct_probe_requests']}-request probe)"
                        if "distinct_embeddings" in r else str(r["distinct_answers"]))
            lines.append(f"| {name}, {r['clients']} clients | {r['texts_per_s'] or 0.0:.1f} | {r['latency_ms']['p50']} "
                         f"| {r['latency_ms']['p99']} | {r['status_counts']} | {distinct} |")
    if inf_rows:
        lines += ["", "| clients | steadyclip texts/s | Infinity texts/s | steadyclip / Infinity |", "|---|---|---|---|"]
        for s, i in zip(doc["server"], inf_rows, strict=True):
            a, b = s["texts_per_s"] or 0.0, i["texts_per_s"] or 0.0
            lines.append(f"| {s['clients']} | {a:.1f} | {b:.1f} | {a / b:.2f}x |" if b else
                         f"| {s['clients']} | {a:.1f} | {b:.1f} | n/a |")
    else:
        lo, hi = INFINITY_TEXTS_PER_S
        lines += ["", f"Infinity was not run ({(doc.get('infinity') or {}).get('skipped', 'no --infinity')}): "
                  f"DESIGN.md quotes {lo:.0f}-{hi:.0f} texts/s for it, so the server is "
                  + ", ".join(f"{(r['texts_per_s'] or 0) / hi:.2f}-{(r['texts_per_s'] or 0) / lo:.2f}x at "
                              f"{r['clients']} clients" for r in doc["server"])
                  + " (quoted, not measured)."]
    return lines + ["", _goal(doc["server"], inf_rows)]


def _infinity_notes(inf: dict[str, Any]) -> list[str]:
    if "server" not in inf:
        return []
    c = inf["check"]
    return ["", (f"Infinity {c['infinity_emb']} (transformers {c['transformers']}, torch {c['torch']}, its default "
                 f"{c['torch_threads']} torch thread(s), one process), installed with `pip install {inf['pip']}` in "
                 f"`{inf['venv']}`, run as `{inf['command']}` (otherwise its defaults: batch size 32, torch.compile, "
                 f"warm-up, no disk cache); ready in {inf['ready_s']} s. Same weights: open_clip's state dict "
                 f"converted to transformers' CLIPModel; {c['tokenizer']} ids {'equal' if c['token_ids_equal'] else 'DIFFER'}"
                 f" to open_clip's on {c['texts_checked']} texts; min cosine vs open_clip: text features "
                 f"{c['text_min_cosine']:.7f}, image features {c['image_min_cosine']:.7f}, Infinity's served "
                 f"embeddings {inf['served_min_cosine']:.7f}. Infinity's distinct answers count embeddings "
                 "(a probe after each timed run, same client count): its response bodies carry a fresh id. "
                 "Its texts/s count successful requests only, as the server's do.")]


def _report(doc: dict[str, Any]) -> str:
    mo = doc["model_only"]
    vs = " vs Infinity" if "server" in (doc.get("infinity") or {}) else ""
    lines = [f"# Texts: server vs model-only{vs} ({doc['model']})", "",
             (f"Command: `{doc.get('command', 'python -m benchmarks.texts')}`. CPU: {doc['cpu']}, "
             f"{doc['cpus']} usable CPUs; model-only at {doc['threads']} thread(s), one process each; the server "
             "with its defaults (one replica per usable CPU). Texts: short queries (3-8 tokens)."), "",
             f"| model-only | texts/s | x {next(iter(mo))} |", "|---|---|---|"]
    ref = next(iter(mo.values()))
    for name, v in mo.items():
        lines.append(f"| {name} | {v:.1f} | {v / ref:.2f}x |")
    lines += ["", *_server_rows(doc), *_infinity_notes(doc.get("infinity") or {})]
    return "\n".join(lines) + "\n"


def _cpu() -> str:
    from steadyclip.numerics.cpuid import cpu_facts

    return str(cpu_facts().get("cpu_model") or "unknown")


def _infinity_venv(arg: Path | None, quick: bool) -> tuple[Path | None, str]:
    """The Infinity venv to run, or None and why not."""
    if quick:
        return None, "--quick serves the demo model (a timm ConvNeXt tower), which Infinity cannot load"
    venv = arg if arg is not None else REPO / ".venv-infinity"
    if not (venv / "bin" / "infinity_emb").exists():
        return None, f"no Infinity in {venv} (`make bench-infinity` builds .venv-infinity)"
    return venv, ""


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--infinity", type=Path, metavar="VENV",
                   help="Infinity's venv (default: .venv-infinity in the repo root, when it exists)")
    p.add_argument("--no-infinity", action="store_true", help="steadyclip only, even when .venv-infinity exists")
    p.add_argument("--out-dir", type=Path, default=REPO / "benchmarks" / "results")
    args = p.parse_args(argv)
    if args.infinity is not None and not (args.infinity / "bin" / "infinity_emb").exists():
        p.error(f"--infinity {args.infinity}: no bin/infinity_emb there")
    venv, why = (None, "--no-infinity") if args.no_infinity else _infinity_venv(args.infinity, args.quick)
    requests, seconds = (60, 20.0) if args.quick else (600, 60.0)
    with tempfile.TemporaryDirectory() as tmp:
        state: dict[str, Any] = {}
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
        srv = server(model, pretrained, CLIENTS, requests, seconds)
        # after steadyclip's server has stopped: never both at once
        inf = (infinity(venv, state, Path(tmp), CLIENTS, requests, seconds) if venv is not None
               else {"skipped": why})
    doc = {"model": model, "quick": args.quick, "threads": args.threads, "cpu": _cpu(),
           "cpus": len(os.sched_getaffinity(0)), "host": socket.gethostname(), "date": time.strftime("%Y-%m-%d"),
           "command": " ".join(["python -m benchmarks.texts", *(argv if argv is not None else sys.argv[1:])]),
           "model_only": mo, "server": srv, "infinity": inf}
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
