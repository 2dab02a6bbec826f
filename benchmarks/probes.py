"""Child-process probes besides the contenders: GEMM peak, start-up, text cache, stability, batch jobs.

Each ``run_*`` takes the JSON spec written by ``benchmarks.run`` and returns a
JSON-able dict; ``benchmarks.worker`` adds the process's peak RSS and threads.
"""
from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.report import spread

ADJECTIVES = ("red", "small", "wooden", "striped", "old", "shiny", "furry", "broken", "giant", "tiny",
              "green", "plastic", "wet", "frozen", "golden", "rusty", "paper", "glass", "spotted", "toy",
              "blue", "empty", "folded", "painted", "stone", "velvet", "metal", "round", "square", "long",
              "white", "black", "baby", "wild", "steel", "sleepy", "noisy", "ancient", "modern", "wooly")
NOUNS = ("cat", "dog", "car", "chair", "boat", "kettle", "lamp", "bird", "horse", "guitar", "bicycle", "clock",
         "teapot", "shoe", "tree", "house", "bridge", "train", "apple", "camera", "book", "phone", "key",
         "umbrella", "violin")
LABEL_SPACE = len(ADJECTIVES) * len(NOUNS)  # 1000 distinct labels


def bench_labels(n: int) -> list[str]:
    """``n`` distinct, ImageNet-like labels ("striped teapot"), deterministic."""
    if n > LABEL_SPACE:
        raise ValueError(f"at most {LABEL_SPACE} labels, got {n}")
    return [f"{ADJECTIVES[i % len(ADJECTIVES)]} {NOUNS[i // len(ADJECTIVES)]}" for i in range(n)]


def _quiet() -> None:
    logging.getLogger().setLevel(logging.ERROR)


def _load_steady(spec: dict[str, Any], **engine_kw: Any) -> Any:
    import steadyclip

    if spec.get("bundled"):
        loaded = steadyclip.load("steadyclip-demo")
    else:
        loaded = steadyclip.load(spec["arch"], pretrained=spec["weights"])
    # One process at the plan's thread count, like the contenders it is compared with.
    return steadyclip.Engine(loaded, threads=int(spec["threads"]), **{"replicas": 1, **engine_kw})


# ---- GEMM peak -------------------------------------------------------------------------
def run_gemm(spec: dict[str, Any]) -> dict[str, Any]:
    """Best-of-``reps`` square matmul GFLOP/s per dtype at the process's thread count."""
    n, reps = int(spec.get("n", 2048)), int(spec.get("reps", 6))
    out: dict[str, Any] = {"n": n, "reps": reps}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        gen = torch.Generator().manual_seed(0)
        a = torch.randn(n, n, generator=gen).to(dtype)
        b = torch.randn(n, n, generator=gen).to(dtype)
        torch.matmul(a, b)  # warm-up
        best = float("inf")
        for _ in range(reps):
            t = time.perf_counter()
            torch.matmul(a, b)
            best = min(best, time.perf_counter() - t)
        out[f"{name}_gflops"] = 2 * n**3 / best / 1e9
    return out


# ---- start-up ------------------------------------------------------------------------------
def run_startup(spec: dict[str, Any]) -> dict[str, Any]:
    """Fresh process -> load -> first classification; spec: kind ("steadyclip"|"open_clip"), image, labels."""
    _quiet()
    t_task = time.perf_counter()
    base_imports_s = t_task - spec["_t0_perf"]
    labels = list(spec["labels"])
    if spec["kind"] == "open_clip":
        probs, stages = _startup_open_clip(spec, labels)
        extra: dict[str, Any] = {}
    else:
        probs, stages, extra = _startup_steady(spec, labels)
    first_wall = stages.pop("first_result_wall")
    stages = {"imports_s": base_imports_s, **stages}
    return {"kind": spec["kind"], "first_result_wall": first_wall, "stages": stages,
            "in_process_first_result_s": sum(stages.values()),
            "probs_sha256": hashlib.sha256(np.asarray(probs, dtype=np.float64).tobytes()).hexdigest(), **extra}


def _startup_open_clip(spec: dict[str, Any], labels: list[str]) -> tuple[list[float], dict[str, float]]:
    t = time.perf_counter()
    import open_clip
    from PIL import Image

    if spec["arch"] == "steadyclip-shapes":
        from benchmarks.prep import register_demo_with_open_clip

        register_demo_with_open_clip()
    t_imp = time.perf_counter()
    model, _, preprocess = open_clip.create_model_and_transforms(spec["arch"], pretrained=spec["weights"])
    model.eval()
    tokenizer = open_clip.get_tokenizer(spec["arch"])
    t_load = time.perf_counter()
    with torch.no_grad():
        img = model.encode_image(preprocess(Image.open(spec["image"])).unsqueeze(0))
        txt = model.encode_text(tokenizer([f"a photo of a {lab}." for lab in labels]))
        img /= img.norm(dim=-1, keepdim=True)
        txt /= txt.norm(dim=-1, keepdim=True)
        probs = (100.0 * img @ txt.T).softmax(dim=-1)[0].tolist()
    t_first, wall = time.perf_counter(), time.time()
    return probs, {"import_lib_s": t_imp - t, "load_s": t_load - t_imp, "first_call_s": t_first - t_load,
                   "first_result_wall": wall}


def _startup_steady(spec: dict[str, Any], labels: list[str]) -> tuple[list[float], dict[str, float], dict[str, Any]]:
    t0 = time.perf_counter()
    import steadyclip
    from steadyclip.model import integrity

    t_imp = time.perf_counter()
    engine = _load_steady(spec)
    t_load = time.perf_counter()
    res = engine.classify([spec["image"]], labels)[0]
    t_first, wall = time.perf_counter(), time.time()
    cache = integrity.get_hash_cache()
    # After the first result (not timed in it): what parts of a start cost, measured separately.
    t = time.perf_counter()
    integrity.tensor_digests(engine.loaded.model.state_dict())
    fingerprint_s = time.perf_counter() - t
    t = time.perf_counter()
    integrity.sha256_file(engine.loaded.info.weights_files[0], cache=None)  # what a hash-cache miss costs
    file_hash_s = time.perf_counter() - t
    t = time.perf_counter()
    _ = steadyclip.Engine(engine.loaded, threads=int(spec["threads"]), text_cache=None).provenance
    self_checks_s = time.perf_counter() - t
    extra = {"hash_cache_hits": cache.hits, "hash_cache_misses": cache.misses,
             "fingerprint_recompute_s": fingerprint_s, "engine_self_checks_s": self_checks_s,
             "file_sha256_s": file_hash_s,
             "text_cache_hits": engine.text_cache.hits if engine.text_cache else None,
             "text_cache_misses": engine.text_cache.misses if engine.text_cache else None}
    stages = {"import_lib_s": t_imp - t0, "load_s": t_load - t_imp, "first_call_s": t_first - t_load,
              "first_result_wall": wall}
    return list(res.probs), stages, extra


# ---- text cache --------------------------------------------------------------------------
def run_textcache(spec: dict[str, Any]) -> dict[str, Any]:
    """Class embeddings for n_labels x a template set: miss, hit (same engine), hit (fresh engine)."""
    _quiet()
    from steadyclip.engine.prompts import get_template_set
    from steadyclip.engine.textcache import TextCache

    labels = bench_labels(int(spec["n_labels"]))
    tset = get_template_set(spec.get("templates", "openai-imagenet"))
    engine = _load_steady(spec, text_cache=TextCache(spec["cache_path"]))
    t = time.perf_counter()
    _ = engine.provenance  # one-time self-checks, outside the miss timing
    self_checks_s = time.perf_counter() - t
    t = time.perf_counter()
    miss = engine.class_embeddings(labels, tset)
    miss_s = time.perf_counter() - t
    rows_after_miss = engine.text_forward_rows
    t = time.perf_counter()
    hit = engine.class_embeddings(labels, tset)
    hit_s = time.perf_counter() - t
    fresh = type(engine)(engine.loaded, threads=int(spec["threads"]), text_cache=TextCache(spec["cache_path"]))
    t = time.perf_counter()
    fresh_hit = fresh.class_embeddings(labels, tset)
    fresh_hit_s = time.perf_counter() - t
    return {
        "arch": spec["arch"], "labels": len(labels), "templates": len(tset.templates), "template_set": tset.name,
        "texts": len(labels) * len(tset.templates), "miss_s": miss_s, "hit_s": hit_s,
        "fresh_engine_hit_s": fresh_hit_s, "self_checks_s": self_checks_s,
        "speedup": miss_s / hit_s, "speedup_fresh_engine": miss_s / fresh_hit_s,
        "text_rows_encoded_on_miss": rows_after_miss, "text_rows_encoded_on_hit": engine.text_forward_rows - rows_after_miss,
        "text_rows_encoded_fresh_engine": fresh.text_forward_rows,
        "hit_bitwise_equal": bool(np.array_equal(miss, hit) and np.array_equal(miss, fresh_hit)),
        "miss_texts_per_s": len(labels) * len(tset.templates) / miss_s,
    }


# ---- the reported symptom ------------------------------------------------------------------
def _careless_probs(spec: dict[str, Any], runs: int) -> list[list[list[float]]]:
    """open_clip used as a careless script does: train mode (never .eval()), demo weights loaded.

    Returns probabilities as [image][run][label].
    """
    import open_clip
    from PIL import Image
    from safetensors.torch import load_file

    from steadyclip.model.registry import demo_labels, register_demo_config

    register_demo_config()
    model = open_clip.create_model("steadyclip-shapes")  # train mode: dropout and DropPath active
    model.load_state_dict(load_file(spec["weights"]))
    tokenizer = open_clip.get_tokenizer("steadyclip-shapes")
    preprocess = open_clip.image_transform(model.visual.image_size, is_train=False)
    text = tokenizer([f"a photo of a {lab}." for lab in demo_labels()])
    out = []
    for path in spec["images"]:
        image = preprocess(Image.open(path)).unsqueeze(0)
        per_run = []
        for _ in range(runs):
            with torch.no_grad():  # the README's zero-shot snippet, minus model.eval()
                img = model.encode_image(image)
                txt = model.encode_text(text)
                img /= img.norm(dim=-1, keepdim=True)
                txt /= txt.norm(dim=-1, keepdim=True)
                per_run.append((100.0 * img @ txt.T).softmax(dim=-1)[0].tolist())
        out.append(per_run)
    return out


def run_careless_once(spec: dict[str, Any]) -> dict[str, Any]:
    """One fresh-process run of the careless script over every image (the parent runs it several times)."""
    _quiet()
    return {"probs": [runs[0] for runs in _careless_probs(spec, 1)]}


def run_stability(spec: dict[str, Any]) -> dict[str, Any]:
    """Each image classified ``runs`` times in one process: careless open_clip vs steadyclip strict."""
    _quiet()
    from steadyclip.model.registry import demo_labels

    runs = int(spec["runs"])
    careless = _careless_probs(spec, runs)
    engine = _load_steady(spec, text_cache=None)
    steady = [[list(engine.classify([path], demo_labels())[0].probs) for _ in range(runs)] for path in spec["images"]]
    return {"images": [Path(p).name for p in spec["images"]], "labels": len(demo_labels()), "runs": runs,
            "careless_open_clip": [spread(r) for r in careless], "steadyclip_strict": [spread(r) for r in steady]}


# ---- batch jobs ----------------------------------------------------------------------------
def run_batch_throughput(spec: dict[str, Any]) -> dict[str, Any]:
    """``steadyclip.batch.measure_throughput``: a batch job over files vs the model alone."""
    _quiet()
    from steadyclip.batch import measure_throughput

    engine = _load_steady(spec, micro_batch=int(spec["micro_batch"]), text_cache=None)
    workers = spec.get("workers")
    report = measure_throughput(engine, list(spec["paths"]), workers=None if workers is None else int(workers))
    out = report.to_dict()
    # run_batch learns the embedding width from one text forward (padded to the text micro-batch):
    # a fixed cost per job, timed here on its own so the report can say what it costs.
    t = time.perf_counter()
    engine.embed_texts(["a photo."])
    out["dim_probe_s"] = time.perf_counter() - t
    out["text_micro_batch"] = engine.text_micro_batch
    steady_s = max(report.batch_s - out["dim_probe_s"], 1e-9)
    out["ratio_without_dim_probe"] = report.images / steady_s / report.model_items_per_s
    out["arch"] = spec["arch"]
    return out
