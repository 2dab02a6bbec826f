"""The contenders, each written the way its users write it, timed the same way.

1. ``openclip-readme``  open_clip as its README shows: create_model_and_transforms, eval,
   no_grad, one image at a time. (The README's ``torch.autocast("cuda")`` is a no-op
   on a CPU-only machine and is left out.)
2. ``openclip-best``    open_clip best effort: batched at steadyclip's micro-batch, inference_mode.
3. ``hf-transformers``  Hugging Face ``CLIPModel.from_pretrained`` (ViT-B/32 dims, random init
   saved locally) + ``AutoImageProcessor``, batched, inference_mode.
4. ``steadyclip-strict`` ``steadyclip.load`` + ``Engine(profile="strict")``.
5. ``steadyclip-fast``  ``Engine(profile="fast")``: bf16 weights cast once, bf16 inputs. On a CPU
   without native bf16 it refuses (by design); the row then records the refusal, not a time.
6. ``openclip-bf16``    open_clip with the model cast to bf16 once and bf16 inputs: what the
   hardware gives bf16 without steadyclip's checks (the issue-15 reference).

Plus ``steadyclip-fast-emulated``: the fast profile forced onto emulated bf16
(``allow_emulated_bf16=True``), a labelled extra row measured only where native bf16 is
absent (elsewhere it is row 5); and, for conv nets, ``steadyclip-strict-onednn``: strict
with the recorded oneDNN opt-in (``Engine(onednn=True)``), which strict leaves off by default.

Every contender embeds images to L2-normalised vectors two ways: end to end from
the files (decode, preprocess, forward), and model-only from the same pre-decoded
pixel tensors. Peers never import steadyclip (its import sets ``MKL_CBWR``).
"""
from __future__ import annotations

import importlib
import logging
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

CONTENDERS = ("openclip-readme", "openclip-best", "hf-transformers", "steadyclip-strict", "steadyclip-fast",
              "steadyclip-strict-onednn", "steadyclip-fast-emulated", "openclip-bf16")
STEADYCLIP = ("steadyclip-strict", "steadyclip-fast", "steadyclip-strict-onednn", "steadyclip-fast-emulated")


class NotRun(Exception):
    """A contender that refused to run here (e.g. fast without native bf16): recorded, not timed."""


class Contender(Protocol):
    def embed_files(self, paths: Sequence[str]) -> np.ndarray: ...
    def embed_pixels(self, pixels: torch.Tensor) -> np.ndarray: ...


def _open(path: str) -> Any:
    from PIL import Image

    return Image.open(path)


class OpenClipReadme:
    """(1) The README flow: one image per forward, under ``torch.no_grad()``."""

    def __init__(self, arch: str, weights: str) -> None:
        import open_clip

        self.model, _, self.preprocess = open_clip.create_model_and_transforms(arch, pretrained=weights)
        self.model.eval()

    def _one(self, x: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            f = self.model.encode_image(x)  # (1, D)
            f /= f.norm(dim=-1, keepdim=True)
        out: np.ndarray = f.numpy()
        return out

    def embed_files(self, paths: Sequence[str]) -> np.ndarray:
        return np.concatenate([self._one(self.preprocess(_open(p)).unsqueeze(0)) for p in paths])

    def embed_pixels(self, pixels: torch.Tensor) -> np.ndarray:
        return np.concatenate([self._one(pixels[i : i + 1]) for i in range(pixels.shape[0])])


class OpenClipBest:
    """(2) open_clip as a careful user batches it: micro-batches, ``inference_mode``."""

    def __init__(self, arch: str, weights: str, micro_batch: int, dtype: torch.dtype = torch.float32) -> None:
        import open_clip

        self.model, _, self.preprocess = open_clip.create_model_and_transforms(arch, pretrained=weights)
        self.model.eval()
        self.dtype = dtype
        if dtype != torch.float32:
            self.model.to(dtype)  # (6): cast once, as a bf16-minded user would
        self.mb = micro_batch

    def embed_pixels(self, pixels: torch.Tensor) -> np.ndarray:
        outs = []
        with torch.inference_mode():
            for chunk in torch.split(pixels, self.mb):
                outs.append(F.normalize(self.model.encode_image(chunk.to(self.dtype)).float(), dim=-1).numpy())
        return np.concatenate(outs)

    def embed_files(self, paths: Sequence[str]) -> np.ndarray:
        outs = []
        for i in range(0, len(paths), self.mb):
            batch = torch.stack([self.preprocess(_open(p)) for p in paths[i : i + self.mb]])  # (b, 3, H, W)
            outs.append(self.embed_pixels(batch))
        return np.concatenate(outs)


class HFClip:
    """(3) Hugging Face transformers: ``CLIPModel`` + its image processor, batched."""

    def __init__(self, folder: str, micro_batch: int) -> None:
        hf: Any = importlib.import_module("transformers")  # partly typed: Any, with or without its stubs
        hf.utils.logging.disable_progress_bar()
        self.model = hf.CLIPModel.from_pretrained(folder)
        self.model.eval()
        self.processor = hf.AutoImageProcessor.from_pretrained(folder)
        self.mb = micro_batch

    def _features(self, pixels: torch.Tensor) -> torch.Tensor:
        out: Any = self.model.get_image_features(pixel_values=pixels)
        # transformers >= 5 returns a model output whose pooler_output is the projected embedding.
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def embed_pixels(self, pixels: torch.Tensor) -> np.ndarray:
        outs = []
        with torch.inference_mode():
            for chunk in torch.split(pixels, self.mb):
                outs.append(F.normalize(self._features(chunk), dim=-1).numpy())
        return np.concatenate(outs)

    def embed_files(self, paths: Sequence[str]) -> np.ndarray:
        outs = []
        for i in range(0, len(paths), self.mb):
            images = [_open(p).convert("RGB") for p in paths[i : i + self.mb]]
            pixels = self.processor(images=images, return_tensors="pt")["pixel_values"]  # (b, 3, 224, 224)
            outs.append(self.embed_pixels(pixels))
        return np.concatenate(outs)


class Steady:
    """(4)/(5) steadyclip: verified load, deterministic engine."""

    def __init__(self, source: str, weights: str | None, profile: str, micro_batch: int, threads: int,
                 onednn: bool | None = None, emulated: bool = False) -> None:
        import steadyclip
        from steadyclip.engine.precision import cpu_bf16_support
        from steadyclip.errors import DeviceError

        if emulated and cpu_bf16_support().native:
            raise NotRun("this CPU has native bf16: the steadyclip-fast row is the fast profile, nothing to force")
        self.loaded = steadyclip.load(source, pretrained=weights)
        kw: dict[str, Any] = {} if onednn is None else {"onednn": onednn}  # the default is the profile's
        if emulated:
            kw["allow_emulated_bf16"] = True
        try:
            # One process at `threads` threads, like every other contender here (replicas across the
            # cores are benchmarks.scale's subject, against a loop that uses them too).
            self.engine = steadyclip.Engine(self.loaded, profile=profile, micro_batch=micro_batch, threads=threads,
                                            replicas=1, text_cache=None, **kw)
        except DeviceError as e:  # fast without native bf16: the refusal is the result
            raise NotRun(f"refused: {e}") from e

    def embed_files(self, paths: Sequence[str]) -> np.ndarray:
        out: np.ndarray = self.engine.embed_images(list(paths))
        return out

    def embed_pixels(self, pixels: torch.Tensor) -> np.ndarray:
        out: np.ndarray = self.engine.embed_pixels(pixels)
        return out


def build(spec: dict[str, Any]) -> Contender:
    """The contender named by ``spec["contender"]`` for ``spec["arch"]``."""
    name, arch, mb = spec["contender"], spec["arch"], int(spec["micro_batch"])
    if arch == "steadyclip-shapes" and name not in STEADYCLIP:
        from benchmarks.prep import register_demo_with_open_clip

        register_demo_with_open_clip()
    if name == "openclip-readme":
        return OpenClipReadme(arch, spec["weights"])
    if name == "openclip-best":
        return OpenClipBest(arch, spec["weights"], mb)
    if name == "openclip-bf16":
        return OpenClipBest(arch, spec["weights"], mb, torch.bfloat16)
    if name == "hf-transformers":
        return HFClip(spec["hf_dir"], mb)
    if name in STEADYCLIP:
        source, weights = ("steadyclip-demo", None) if spec.get("bundled") else (arch, spec["weights"])
        onednn = True if name.endswith("-onednn") else None
        return Steady(source, weights, name.split("-")[1], mb, int(spec["threads"]), onednn,
                      emulated=name.endswith("-emulated"))
    raise ValueError(f"unknown contender {name!r}; one of {CONTENDERS}")


def _timed(fn: Callable[[], np.ndarray], repeats: int) -> tuple[list[float], list[np.ndarray]]:
    times, outs = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        outs.append(fn())
        times.append(time.perf_counter() - t)
    return times, outs


def _rates(n: int, times: list[float]) -> dict[str, Any]:
    return {"best_ips": n / min(times), "median_ips": n / statistics.median(times), "times_s": times}


def run_contender(spec: dict[str, Any]) -> dict[str, Any]:
    """Load, warm up, then time model-only and end-to-end passes; save model-only embeddings.

    Spec: contender, arch, weights, hf_dir, bundled, paths, pixels (.npy), micro_batch,
    threads, repeats_model, repeats_e2e, emb_out.
    """
    logging.getLogger().setLevel(logging.ERROR)
    t = time.perf_counter()
    try:
        c = build(spec)
    except NotRun as e:
        return {"contender": spec["contender"], "arch": spec["arch"], "not_run": str(e)}
    load_s = time.perf_counter() - t
    pixels = torch.from_numpy(np.load(spec["pixels"]))  # (N, 3, H, W), the same tensors for every contender
    paths = list(spec["paths"])
    n, mb = pixels.shape[0], int(spec["micro_batch"])
    t = time.perf_counter()
    c.embed_pixels(pixels[:mb])  # warm-up: allocator, oneDNN primitives, steadyclip's one-time self-checks
    warmup_s = time.perf_counter() - t
    m_times, m_outs = _timed(lambda: c.embed_pixels(pixels), int(spec["repeats_model"]))
    e_times, e_outs = _timed(lambda: c.embed_files(paths), int(spec["repeats_e2e"]))
    np.save(spec["emb_out"], m_outs[0])
    result: dict[str, Any] = {
        "contender": spec["contender"], "arch": spec["arch"], "images": n, "micro_batch": mb,
        "load_s": load_s, "warmup_s": warmup_s,
        "model_only": _rates(n, m_times), "e2e": _rates(len(paths), e_times),
        # Bitwise equal across repeated passes (same process, same batches)?
        "repeat_identical": all(np.array_equal(m_outs[0], o) for o in m_outs)
        and all(np.array_equal(e_outs[0], o) for o in e_outs),
        "e2e_vs_model_max_abs": float(np.abs(e_outs[0] - m_outs[0]).max()),
        "emb_dim": int(m_outs[0].shape[1]),
    }
    if isinstance(c, Steady):
        prov = c.engine.provenance
        result["batch_path"] = prov.batch_path
        result["precision"] = prov.precision
        result["reduced_precision"] = prov.reduced_precision
        from steadyclip.numerics import determinism

        result["mkl_cbwr_effective"] = determinism.mkl_cbwr_effective()
    if isinstance(c, HFClip):
        result["hf_processor"] = type(c.processor).__name__
        result["hf_attn"] = str(getattr(c.model.config, "_attn_implementation", None))
    return result
