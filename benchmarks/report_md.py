"""Render a benchmark run as Markdown (tables + profiling findings) and a PNG chart (matplotlib, Agg)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

NAMES = {
    "openclip-readme": "(1) open_clip, README style (batch 1, no_grad)",
    "openclip-best": "(2) open_clip best effort (batched, inference_mode)",
    "hf-transformers": "(3) HF transformers CLIPModel (batched)",
    "steadyclip-strict": "(4) steadyclip strict",
    "steadyclip-fast": "(5) steadyclip fast (bf16 weights, native bf16 CPUs)",
    "steadyclip-strict-onednn": "(4b) steadyclip strict + oneDNN opt-in",
    "steadyclip-fast-emulated": "(5e) steadyclip fast FORCED onto emulated bf16 (allow_emulated_bf16)",
    "openclip-bf16": "(6) open_clip, model cast to bf16 once, bf16 inputs",
}
SHORT = {"openclip-readme": "(1) oc README", "openclip-best": "(2) oc best", "hf-transformers": "(3) HF",
         "steadyclip-strict": "(4) sc strict", "steadyclip-fast": "(5) sc fast",
         "steadyclip-strict-onednn": "(4b) sc strict+oneDNN", "steadyclip-fast-emulated": "(5e) sc fast emul.",
         "openclip-bf16": "(6) oc bf16"}


def gemm_runs(results: dict[str, Any]) -> dict[str, Any]:
    """Every GEMM measurement of the run (start, in two environments, and end)."""
    return {**results.get("gemm", {}), **results.get("gemm_end", {})}


def _f(v: float | None, fmt: str = ".2f", suffix: str = "") -> str:
    return "-" if v is None else f"{v:{fmt}}{suffix}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"] + [
        "| " + " | ".join(r) + " |" for r in rows]


def markdown(doc: dict[str, Any], *, chart: str) -> str:
    m, plan, d = doc["machine"], doc["plan"], doc["derived"]
    out = [f"# steadyclip benchmarks: {m['cpu']}", "",
           (f"Command: `{doc['command']}` (`make bench` runs the full plan). Threads: **{m['threads']}** for every "
           f"contender (`torch.set_num_threads`, OMP/MKL_NUM_THREADS); micro-batch / peer batch size: "
           f"**{m['micro_batch']}**. {m['cpu_count']} vCPUs shared with other jobs: load average "
           f"{m['loadavg_start'][0]:.1f} at start, {m['loadavg_end'][0]:.1f} at end - read ratios, not absolutes. "
           f"Total run time {doc['total_s'] / 60:.1f} min."), "",
           "Versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v) + ".", "",
           "Weights are random-init (no model hub reachable; timing is unaffected), loaded from `.safetensors` "
           "files through each library's own loading path. Throughput is the best of the passes in the "
           "contender's own process (medians in the JSON); every contender runs in a fresh process, so peak RSS "
           "is per contender." + (" On ViT-B-32, (2) and (4) each run in two processes, in the order (2) (4) ... "
                                  "(4) (2), so that drifting background load hits both alike."
                                  if plan.get("pair_rounds", 1) > 1 else ""), ""]
    prep = doc.get("prep", {})
    if prep:
        im = prep["images"]
        out += [(f"Images: {im['count']} generated photos ({im['jpeg']} JPEG, {im['png']} PNG; sizes "
                f"{', '.join(im['sizes'])}; {im['total_mb']} MB; sha256 {im['sha256'][:12]})."), ""]
        demo = prep["archs"].get("steadyclip-shapes", {}).get("demo_weights")
        if demo:
            out += [f"Demo model weights: {demo}.", ""]
    out += ["## Goals", ""] + _table(["goal", "target", "measured", "status"],
                                     [[g["goal"], g["target"], g["measured"], f"**{g['status']}**"]
                                      for g in doc["goals"]]) + [""]
    out += _throughput(d, doc) + _startup(doc) + _textcache(doc) + _batch_server(doc) + _stability(doc)
    out += _profile(doc) + _gemm(doc)
    if doc["errors"]:
        out += ["## Errors", ""] + [f"- `{k}`: {v.splitlines()[0]} ... `{_last_line(v)}`"
                                    for k, v in doc["errors"].items()] + [""]
    out += [f"![throughput chart]({chart})", ""]
    return "\n".join(out)


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1][:200] if lines else ""


def _throughput(d: dict[str, Any], doc: dict[str, Any]) -> list[str]:
    out = ["## Throughput", "",
           (f"fp32 GEMM peak here: {_f(d['gemm_peak_fp32'], '.1f')} GFLOP/s (bf16: {_f(d['gemm_peak_bf16'], '.1f')}). "
           "GFLOP/s is model-only; bf16 rows are against the bf16 peak. Ratios are to (2). `max |d|` compares each contender's embeddings with (2)'s on the same weights and "
           "pixels (HF is a different random model: `-`)."), ""]
    prep = doc.get("prep", {}).get("archs", {})
    for arch, rows in d["throughput"].items():
        a = prep.get(arch, {})
        out += [(f"### {arch} ({rows[0]['images'] if rows else 0} images, {_f(a.get('image_gflop'), '.2f')} GFLOP/image, "
                f"{a.get('params_m', '-')} M params, weights {a.get('weights_mb', '-')} MB)"), ""]
        out += _table(["contender", "end-to-end img/s", "x (2)", "model-only img/s", "x (2)", "GFLOP/s",
                       "% GEMM peak", "peak RSS MB", "load s", "max |d| vs (2)", "repeatable"],
                      [[NAMES.get(r["contender"], r["contender"]) + (f" [{r['processes']} processes]"
                                                                     if r["processes"] > 1 else ""), _f(r["e2e_ips"]), _f(r["e2e_ratio"], ".2f", "x"),
                        _f(r["model_ips"]), _f(r["model_ratio"], ".2f", "x"), _f(r["gflops"], ".1f"),
                        _f(None if r["peak_share"] is None else 100 * r["peak_share"], ".0f",
                           "%" + (" (bf16)" if r.get("peak_dtype") == "bf16" else "")),
                        _f(r["peak_rss_mb"], ".0f"), _f(r["load_s"], ".1f"),
                        _f(r["max_abs_vs_baseline"], ".1e"), "yes" if r["repeat_identical"] else "NO"]
                       for r in rows]) + [""]
        out += [f"- {NAMES.get(name, name)}: not run here: {why}" for name, why in
                d.get("not_run", {}).get(arch, {}).items()]
        out += [f"- {NAMES.get(r['contender'], r['contender'])}: drift vs strict on the probe: min cosine "
                f"{r['drift_vs_strict']['min_cosine']:.6f}, max |dp| {r['drift_vs_strict']['max_abs_prob']:.3g}, "
                f"top-1 agreement {r['drift_vs_strict']['top1_agreement']:.3f}" for r in rows if r.get("drift_vs_strict")]
        out += [""]
    return out


def _startup(doc: dict[str, Any]) -> list[str]:
    s = doc.get("startup")
    if not s:
        return []
    rows = []
    for phase in ("cold", "warm"):
        for kind in ("open_clip", "steadyclip"):
            r = s.get(f"{kind}_{phase}")
            if not r:
                continue
            st = r["stages"]
            rows.append([f"{kind} {phase}", _f(r["time_to_first_result_s"]), _f(st["imports_s"] + st["import_lib_s"]),
                         _f(st["load_s"]), _f(st["first_call_s"]), _f(r["process"]["peak_rss_mb"], ".0f"),
                         f"{r['hash_cache_hits']} / {r['hash_cache_misses']}" if kind == "steadyclip" else "-",
                         r["probs_sha256"][:10]])
    sw = s.get("steadyclip_warm", {})
    return [f"## Start-up to first result ({s['arch']}, new process, classify 1 image x 3 labels)", "",
            (f"Cold: new process, empty steadyclip cache dir, weights file ({s['weights_mb']} MB) evicted from the "
            f"page cache (`posix_fadvise(DONTNEED)`: {s.get('cold_page_cache_evicted')}). Warm: new process, hash "
            "and text caches filled, file in the page cache. Time is from `Popen` to the result. `import steadyclip` "
             "is lazy: steadyclip's load time includes importing open_clip, which is under imports for open_clip."), ""] + _table(
        ["run", "to first result s", "imports s", "load s", "first call s", "peak RSS MB", "hash cache hit/miss",
         "probs sha256"], rows) + [
        "", (f"Inside a warm steadyclip start (measured after the first result): the state fingerprint over all "
        f"tensors costs {_f(sw.get('fingerprint_recompute_s'))} s (the file itself is not re-hashed; hashing it "
        f"costs {_f(sw.get('file_sha256_s'))} s); a second engine resolves its batch paths in "
        f"{_f(sw.get('engine_self_checks_s'))} s (self-check verdicts are remembered on disk after the first start; "
        f"what a self-check costs is in the profiling section)."), ""]


def _textcache(doc: dict[str, Any]) -> list[str]:
    rows = []
    for key in sorted(k for k in doc if k.startswith("textcache/")):
        t = doc.get(key)
        if t:
            rows.append([t["arch"], f"{t['labels']} x {t['templates']} = {t['texts']}", _f(t["miss_s"]),
                         _f(t["miss_texts_per_s"], ".0f"), _f(1000 * t["hit_s"], ".1f"), f"x{t['speedup']:.0f}",
                         _f(1000 * t["fresh_engine_hit_s"], ".1f"), str(t["text_rows_encoded_on_hit"]),
                         "yes" if t["hit_bitwise_equal"] else "NO"])
    if not rows:
        return []
    return ["## Text-embedding cache (`templates=\"openai-imagenet\"`)", ""] + _table(
        ["model", "labels x templates", "miss s", "texts/s", "hit ms", "speed-up", "hit ms (new engine)",
         "text rows encoded on hit", "hit == miss bitwise"], rows) + [""]


def _batch_server(doc: dict[str, Any]) -> list[str]:
    out: list[str] = []
    b = doc.get("batch")
    if b:
        out += [f"## Batch job ({b['arch']}, `steadyclip.batch.measure_throughput`)", "",
                (f"`run_batch` over {b['images']} files: **{b['batch_items_per_s']:.2f} img/s** vs model-only "
                f"{b['model_items_per_s']:.2f} img/s at micro-batch {b['micro_batch']}, {b['threads']} thread(s), "
                f"{b['workers']} decoder process(es): ratio **{b['ratio']:.2f}** ({b['batch_s']:.2f} s vs "
                f"{b['model_s']:.2f} s). Decode alone: {b['decode_items_per_s']:.1f} img/s per process."),
                (f"An embeddings-only `run_batch` asks the text tower for the embedding width (`engine.embed_texts([\"a photo.\"])`, "
                f"one text padded to a {b['text_micro_batch']}-row micro-batch): {b['dim_probe_s']:.2f} s per job, "
                f"measured on its own. Without it the ratio would be {b['ratio_without_dim_probe']:.2f}."), ""]
    t = doc.get("texts")
    if t:
        ref = t.get("openclip") or t["steadyclip_full"]
        out += [f"## Texts, model-only ({t['arch']}, {t['texts']} short texts, `benchmarks.texts`)", ""]
        out += _table(["contender", "texts/s", "x first row"], [
            [name, f"{t[key]:.1f}", f"{t[key] / ref:.2f}x"] for key, name in (
                ("openclip", "open_clip encode_text, 32 x 77 tokens"),
                ("steadyclip_full", "steadyclip strict, text_buckets='full' (32 x 77)"),
                ("steadyclip_buckets", "steadyclip strict, sequence-length buckets (default)")) if key in t]) + [""]
    s = doc.get("server")
    if s:
        lat = s["latency_ms"]
        bt = s.get("batching", {})
        out += ["## Server (`steadyclip serve`, demo model, loopback)", "",
                (f"{s['clients']} clients, {s['ok']}/{s['sent']} ok in {s['duration_s']} s: **{s['throughput_rps']} "
                f"req/s**, latency p50 {lat['p50']} ms, p90 {lat['p90']} ms, **p99 {lat['p99']} ms**, max {lat['max']} "
                f"ms. Distinct answers: {s['distinct_answers']} (1 = every response identical). Rows per forward: "
                f"{bt.get('rows_per_forward', '-')} (micro-batch {bt.get('max_rows', '-')}). Server args: "
                f"`{' '.join(str(a) for a in s['serve_args'])}`."), ""]
    return out


def _stability(doc: dict[str, Any]) -> list[str]:
    s = doc.get("stability")
    if not s:
        return []
    rows = []
    for i, name in enumerate(s["images"]):
        c, f, st = s["careless_open_clip"][i], s["careless_fresh_processes"][i], s["steadyclip_strict"][i]
        rows.append([f"`{name}`", f"{c['max_spread']:.4g}", f"{c['top1_prob_min']:.3f} - {c['top1_prob_max']:.3f}",
                     str(c["distinct_top1"]), f"{f['max_spread']:.4g} ({f['runs']} runs)", str(f["distinct_top1"]),
                     f"{st['max_spread']:g}", "yes" if st["bitwise_identical"] else "NO"])
    return ["## The reported symptom: same image, same labels, repeated runs", "",
            (f"Demo model, {s['labels']} labels; open_clip as a careless script runs it (train mode: no `.eval()`, "
             f"the README's `100 * img @ txt.T` softmax) vs `steadyclip` strict. Spread = largest max-min of any "
             f"label's probability over {s['runs']} runs in one process (and over fresh processes)."), ""] + _table(
        ["image", "careless: spread", "careless: top-1 prob range", "careless: distinct top-1",
         "careless, fresh processes: spread", "distinct top-1", "steadyclip strict: spread", "bitwise identical"],
        rows) + [""]


def _ms(v: float | None) -> str:
    return _f(None if v is None else 1000 * v, ".2f", " ms")


def _profile(doc: dict[str, Any]) -> list[str]:
    out = ["## Profiling: where steadyclip strict's time goes", "",
           ("Each architecture in one process. Comparisons are timed in adjacent pairs (order alternating) and "
           "reported as the median of the per-pair ratios with its interquartile range: robust to the bursty "
           "load of a shared machine."), ""]
    found = False
    for key, p in doc.items():
        if not key.startswith("profile/") or not isinstance(p, dict):
            continue
        found = True
        c, ab, tl = p["costs"], p["ab"], p["tails"]
        lo, hi = c["strict_flags_slowdown_iqr"]
        shapes = ", ".join(_shape_note(k, v) for k, v in tl["shapes"].items())
        out += [(f"### {p['arch']} (micro-batch {p['micro_batch']}, {p['threads']} thread(s), batch path "
                f"`{p['batch_path']}`)"), "",
                (f"- `Engine.embed_pixels` vs the bare open_clip loop on one micro-batch, {ab['pairs']} pairs: engine "
                 f"speed **{ab['engine_speed_ratio']:.3f}x** of bare (IQR {ab['ratio_q1']:.3f}-{ab['ratio_q3']:.3f}; "
                 f"medians {_ms(ab['a_median_s'])} vs {_ms(ab['b_median_s'])}). Outputs differ by at most "
                 f"{p['engine_vs_bare_max_abs']:.1e}."),
                (f"- Fixed cost per engine call: `check_buffers` {_ms(c['check_buffers_s'])}, "
                 f"`ensure_inference_state` {_ms(c['ensure_inference_state_s'])}, `determinism.applied` enter+exit "
                 f"{_ms(c['applied_enter_exit_s'])}, float64 numpy normalisation {_ms(c['normalise_numpy_f64_s'])} "
                 f"(torch: {_ms(c['normalise_torch_s'])}): total {_ms(c['engine_fixed_overhead_per_call_s'])} = "
                 f"**{100 * c['overhead_share_of_one_batch']:.2f}%** of one {p['micro_batch']}-row forward "
                 f"({_ms(c['forward_s'])})."),
                (f"- The bare forward under the strict profile's flags vs without, {c['strict_flags_pairs']} pairs: "
                 f"**x{c['strict_flags_slowdown']:.3f}** (IQR {lo:.3f}-{hi:.3f}). " + _conv_note(p)),
                _accounting(p),
                (f"- One image: engine {_ms(tl['one_image_engine_s'])} vs bare batch-1 forward "
                 f"{_ms(tl['one_image_bare_s'])} (path `{tl['batch_path']}`). Under the strict flags a full "
                 f"{p['micro_batch']}-row forward takes {_ms(tl['full_forward_s'])}; smaller shapes vs its rows: "
                 f"{shapes}."),
                (f"- Strict with the recorded oneDNN opt-in (`Engine(onednn=True)`) vs strict, {p['onednn_opt_in']['pairs']} "
                 f"pairs: **{p['onednn_opt_in']['speed_ratio']:.2f}x** the speed; rows differ by up to "
                 f"{p['onednn_opt_in']['max_abs_vs_default']:.1e} (its batch path: "
                 f"`{p['onednn_opt_in']['batch_path']}`)."),
                (f"- Batch-path self-checks when a model is first used on a stack: {p['self_checks_s']:.2f} s; a later "
                 f"engine reads the remembered verdicts in {_ms(p['self_checks_remembered_s'])}."), ""]
        out += ["Top operators (self CPU time, one profiled call each: compare shares, not ms):", ""] + _table(
            ["strict engine op", "ms", "share", "bare open_clip op", "ms", "share"],
            [[a["op"], _f(a["self_ms"], ".1f"), _f(100 * a["share"], ".0f", "%"), b["op"], _f(b["self_ms"], ".1f"),
              _f(100 * b["share"], ".0f", "%")] for a, b in zip(p["top_ops_strict"], p["top_ops_bare"])]) + [""]
        bf = p.get("bf16")
        if bf:
            top = bf["top_ops_autocast"][0]
            out += [(f"bf16 on this CPU (one micro-batch): fp32 {_ms(bf['fp32_s'])}, bf16 autocast (the old `fast` "
                     f"profile) {_ms(bf['autocast_bf16_s'])} (x{bf['autocast_bf16_s'] / bf['fp32_s']:.2f}), all-bf16 (today's `fast`) "
                     f"weights {_ms(bf['pure_bf16_s'])} (x{bf['pure_bf16_s'] / bf['fp32_s']:.2f}). Top autocast op: "
                     f"`{top['op']}` {100 * top['share']:.0f}% ({top['calls']} calls). Min cosine vs fp32: autocast "
                     f"{bf['autocast_min_cosine_vs_fp32']:.5f}, all-bf16 {bf['pure_min_cosine_vs_fp32']:.5f}."), ""]
    return out if found else []


def _accounting(p: dict[str, Any]) -> str:
    """Split the engine's extra time per micro-batch into the parts measured above."""
    c = p["costs"]
    extra = 100 * (1 / p["ab"]["engine_speed_ratio"] - 1)
    flags = 100 * (c["strict_flags_slowdown"] - 1)
    fixed = 100 * c["overhead_share_of_one_batch"]
    return (f"- Accounting: the engine takes {extra:+.1f}% time per micro-batch vs bare; the strict flags explain "
            f"{flags:+.1f}%, the per-call checks {fixed:+.1f}%, leaving {extra - flags - fixed:+.1f}% (noise, "
            f"copies, Python).")


def _shape_note(k: str, v: dict[str, Any]) -> str:
    verdict = "bitwise equal" if v["bitwise_equal_to_full"] else f"differ by {v['max_abs']:.0e}"
    return f"{k} rows {verdict} ({_ms(v['forward_s'])})"


def _conv_note(p: dict[str, Any]) -> str:
    def conv_ms(ops: list[dict[str, Any]]) -> dict[str, float]:
        return {o["op"]: o["self_ms"] for o in ops if "conv" in o["op"]}

    s, b = conv_ms(p["top_ops_strict"]), conv_ms(p["top_ops_bare"])
    if not s and not b:
        return ""
    def fmt(d: dict[str, float]) -> str:
        return ", ".join(f"`{k}` {v:.0f} ms" for k, v in d.items()) or "none in the top ops"

    return f"Convolutions: strict {fmt(s)}; bare {fmt(b)}."


def _gemm(doc: dict[str, Any]) -> list[str]:
    g = gemm_runs(doc)
    if not g:
        return []
    rows = [[k, _f(v["fp32_gflops"], ".1f"), _f(v["bf16_gflops"], ".1f"), str(v["n"]), str(v["process"]["torch_threads"])]
            for k, v in g.items()]
    return ["## GEMM peak (torch.matmul, square, best of reps)", ""] + _table(
        ["environment", "fp32 GFLOP/s", "bf16 GFLOP/s", "n", "threads"], rows) + [""]


def chart(doc: dict[str, Any], path: Path) -> None:
    """Images/s per contender (end-to-end and model-only) per architecture, plus start-up and text cache."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tp = doc["derived"]["throughput"]
    panels = len(tp) + 2
    fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 4.2))
    for ax, (arch, rows) in zip(axes, tp.items()):
        names = [SHORT.get(r["contender"], r["contender"]) for r in rows]
        x = range(len(rows))
        ax.bar([i - 0.2 for i in x], [r["e2e_ips"] for r in rows], 0.4, label="end-to-end")
        ax.bar([i + 0.2 for i in x], [r["model_ips"] for r in rows], 0.4, label="model-only")
        ax.set_xticks(list(x), names, rotation=35, ha="right", fontsize=8)
        ax.set_title(f"{arch}: images/s", fontsize=10)
        ax.legend(fontsize=7)
    ax = axes[-2]
    s = doc.get("startup", {})
    labels = [k for k in ("open_clip_cold", "steadyclip_cold", "open_clip_warm", "steadyclip_warm") if k in s]
    ax.bar(range(len(labels)), [s[k]["time_to_first_result_s"] for k in labels], color="tab:green")
    ax.set_xticks(range(len(labels)), [k.replace("_", " ") for k in labels], rotation=35, ha="right", fontsize=8)
    ax.set_title(f"{s.get('arch', '')} start-up: s to first result", fontsize=10)
    ax = axes[-1]
    tc = [doc[k] for k in sorted(doc) if k.startswith("textcache/")]
    if tc:
        x = range(len(tc))
        ax.bar([i - 0.2 for i in x], [t["miss_s"] for t in tc], 0.4, label="miss")
        ax.bar([i + 0.2 for i in x], [t["hit_s"] for t in tc], 0.4, label="hit")
        ax.set_yscale("log")
        ax.set_xticks(list(x), [f"{t['arch']}\n{t['labels']}x{t['templates']}" for t in tc], fontsize=8)
        ax.legend(fontsize=7)
    ax.set_title("text cache: seconds (log)", fontsize=10)
    fig.suptitle(f"steadyclip benchmarks, {doc['machine']['threads']} thread(s), micro-batch "
                 f"{doc['machine']['micro_batch']}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
