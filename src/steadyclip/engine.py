"""The inference engine: fixed-shape micro-batches, embeddings, zero-shot classification.

Why fixed shapes: on CPU the row computed for an input is bitwise identical
whatever its neighbours *if the batch shape is the same* (measured, DESIGN.md),
but differs between batch sizes. So every forward runs at exactly
``micro_batch`` rows, the tail padded - unless a self-check at first use proves
that a single-row forward gives bitwise the same rows as a full micro-batch, in
which case tails run one row at a time (no padding waste). Either way the
result for an input never depends on how many inputs came with it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any, Literal, cast

import numpy as np
import torch

from steadyclip import determinism, drift, precision
from steadyclip.errors import NumericsError
from steadyclip.images import ImageInput, load_image
from steadyclip.loading import LoadedModel
from steadyclip.prompts import TemplateSet, get_template_set, validate_labels
from steadyclip.results import Classification, Provenance
from steadyclip.selfcheck import SelfCheckStore
from steadyclip.textcache import TextCache

_logger = logging.getLogger(__name__)

BatchInvariance = Literal["auto", "fixed"]


def _versions() -> dict[str, str]:
    import open_clip

    from steadyclip import __version__

    return {"torch": torch.__version__, "open_clip": open_clip.__version__, "steadyclip": __version__,
            "numpy": np.__version__}


class Engine:
    """Runs a verified model deterministically.

    Args:
        loaded: a model from :func:`steadyclip.load`.
        profile: ``"strict"`` (fp32, bitwise reproducible) or ``"fast"`` (autocast, TF32).
        micro_batch: rows per image forward; 1 gives the lowest latency.
        text_micro_batch: rows per text forward.
        threads: intra-op threads during forwards (default: the profile's).
        text_cache: ``"default"`` (on-disk, shared), a :class:`TextCache`, or ``None``.
        batch_invariance: ``"auto"`` self-checks and may skip padding; ``"fixed"`` always pads.
        onednn: oneDNN convolutions (see :func:`steadyclip.determinism.get_profile`); strict default off.
        allow_emulated_bf16: run ``fast`` (bf16) on a CPU without native bf16 anyway (slower than strict;
            recorded in provenance). See :mod:`steadyclip.precision`.

    Example:
        >>> engine = Engine(steadyclip.load())
        >>> engine.classify(["examples/red_circle.png"], ["red circle", "blue square"])[0].label
        'red circle'
    """

    def __init__(
        self,
        loaded: LoadedModel,
        *,
        profile: str = "strict",
        micro_batch: int = 8,
        text_micro_batch: int = 32,
        threads: int | None = None,
        text_cache: TextCache | str | None = "default",
        batch_invariance: BatchInvariance = "auto",
        onednn: bool | None = None,
        allow_emulated_bf16: bool = False,
    ) -> None:
        if micro_batch < 1 or text_micro_batch < 1:
            raise ValueError(f"micro_batch and text_micro_batch must be >= 1, got {micro_batch}, {text_micro_batch}")
        if batch_invariance not in ("auto", "fixed"):
            raise ValueError(f"batch_invariance must be 'auto' or 'fixed', got {batch_invariance!r}")
        self.loaded = loaded
        self.device = next(loaded.model.parameters()).device
        self.profile = determinism.get_profile(profile, threads=threads, device=self.device.type, onednn=onednn)
        # fast: a reduced-precision copy cast once (steadyclip.precision); None = run loaded.model (fp32)
        self._cast = precision.prepare(loaded, self.profile, self.device.type, allow_emulated_bf16=allow_emulated_bf16)
        self.micro_batch = micro_batch
        self.text_micro_batch = text_micro_batch
        self.batch_invariance = batch_invariance
        if text_cache == "default":
            self.text_cache: TextCache | None = TextCache()
        elif isinstance(text_cache, str):
            raise ValueError(f"text_cache must be 'default', a TextCache or None, got {text_cache!r}")
        else:
            self.text_cache = text_cache
        self._lock = threading.RLock()
        self._paths: dict[str, str] = {}
        self._flags: dict[str, Any] | None = None
        self._basis: str | None = None
        self._numerics: str | None = None
        self._provenance: Provenance | None = None
        self.text_forward_rows = 0  # how many text rows the text tower has encoded (cache proof)

    # ---- provenance -------------------------------------------------------------------
    @property
    def provenance(self) -> Provenance:
        """Provenance of results from this engine (built once; self-checks run on first access)."""
        if self._provenance is not None:
            return self._provenance
        with self._lock:
            image_path = self._batch_path("image")
            text_path = self._batch_path("text")
            flags = self._flags if self._flags is not None else self._read_flags()
        info = self.loaded.info
        self._provenance = Provenance(
            model_id=info.model_id, arch=info.arch, weights_sha256=info.weights_sha256,
            fingerprint=info.fingerprint, profile=self.profile.name, precision=self.profile.precision,
            deterministic=self.profile.deterministic_algorithms, device=str(self.device),
            threads=self.profile.threads, micro_batch=self.micro_batch, batch_path=image_path,
            text_micro_batch=self.text_micro_batch, text_batch_path=text_path, flags=flags,
            versions=_versions(), reduced_precision=drift.fast_record(self) if self._cast is not None else None,
        )
        return self._provenance

    def _read_flags(self) -> dict[str, Any]:
        with determinism.applied(self.profile, self.device.type) as flags:
            self._flags = dict(flags)
        return self._flags

    # ---- low-level forwards -------------------------------------------------------------
    def _tower(self, kind: str) -> tuple[Callable[[torch.Tensor], torch.Tensor], int]:
        model: Any = self.loaded.model if self._cast is None else self._cast.model
        fn, size = (model.encode_image, self.micro_batch) if kind == "image" else (model.encode_text,
                                                                                   self.text_micro_batch)
        if self._cast is not None:
            cast = self._cast.cast_input
            return (lambda x: fn(cast(x))), size  # pixels -> the weights' dtype; outputs go back to float32
        return fn, size

    def _forward(self, kind: str, x: torch.Tensor) -> np.ndarray:
        """Encode rows of ``x`` at the engine's fixed shapes; L2-normalised float32 (N, D)."""
        fn, size = self._tower(kind)
        with self._lock:
            self.loaded.ensure_inference_state()
            self.loaded.check_buffers()
            if self._cast is not None:
                self._cast.check()
            path = self._batch_path(kind)
            outs: list[np.ndarray] = []
            with determinism.applied(self.profile, self.device.type) as flags:
                if self._flags is None:
                    self._flags = dict(flags)
                with torch.inference_mode(), determinism.autocast(self.profile, self.device.type):
                    for start in range(0, x.shape[0], size):
                        chunk = x[start : start + size].to(self.device)
                        outs.append(self._run_chunk(fn, chunk, size, path))
            if kind == "text":
                self.text_forward_rows += int(x.shape[0])
        raw = np.concatenate(outs, axis=0) if outs else np.zeros((0, 0), dtype=np.float32)
        return _normalise(raw, kind)

    @staticmethod
    def _run_chunk(fn: Callable[[torch.Tensor], torch.Tensor], chunk: torch.Tensor, size: int,
                   path: str) -> np.ndarray:
        n = chunk.shape[0]
        if n == size:
            return fn(chunk).float().cpu().numpy()
        if path == "verified-invariant":
            return np.concatenate([fn(chunk[i : i + 1]).float().cpu().numpy() for i in range(n)], axis=0)
        pad = torch.zeros((size - n, *chunk.shape[1:]), dtype=chunk.dtype, device=chunk.device)
        return fn(torch.cat([chunk, pad], dim=0)).float().cpu().numpy()[:n]  # (size, D) -> (n, D)

    def _batch_path(self, kind: str) -> str:
        """Which batching path a tower uses; the self-check runs once per model and stack.

        Its verdict is remembered on disk under a key naming everything it depends
        on (weights, code versions, numerics flags, CPU, shape), so a warm start
        does not pay for it again.
        """
        if kind in self._paths:
            return self._paths[kind]
        fn, size = self._tower(kind)
        if size == 1 or self.batch_invariance == "fixed":
            path = "fixed-shape"
        else:
            key = hashlib.sha256(f"{self._numerics_basis()}\0{kind}\0{size}".encode()).hexdigest()
            remembered = SelfCheckStore().get(key)
            if remembered in ("fixed-shape", "verified-invariant"):
                path = remembered
            else:
                path = self._self_check(fn, kind, size)
                SelfCheckStore().put(key, path)
        _logger.info("%s tower batch path: %s (micro-batch %d)", kind, path, size)
        self._paths[kind] = path
        return path

    def _self_check(self, fn: Callable[[torch.Tensor], torch.Tensor], kind: str, size: int) -> str:
        """Are single-row forwards bitwise equal to rows of a full micro-batch?"""
        probe = self._probe_inputs(kind, size)
        with determinism.applied(self.profile, self.device.type), torch.inference_mode(), \
                determinism.autocast(self.profile, self.device.type):
            full = fn(probe).float().cpu().numpy()
            rows = [0, size - 1]
            single = [fn(probe[i : i + 1]).float().cpu().numpy()[0] for i in rows]
        same = all(np.array_equal(full[i], s) for i, s in zip(rows, single))
        return "verified-invariant" if same else "fixed-shape"

    def _probe_inputs(self, kind: str, size: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(1234)
        if kind == "image":
            h, w = self.loaded.info.preprocess.size
            return torch.randn((size, 3, h, w), generator=gen).to(self.device)
        texts = [f"a photo of probe number {i}." for i in range(size)]
        return self.loaded.tokenizer(texts).to(self.device)

    # ---- public API -------------------------------------------------------------------
    @property
    def embedding_dim(self) -> int:
        """Width D of the joint embedding space, read from the model (no forward) when it says."""
        model: Any = self.loaded.model
        proj = getattr(model, "text_projection", None)
        if isinstance(proj, torch.Tensor) and proj.ndim == 2:
            return int(proj.shape[1])
        if isinstance(proj, torch.nn.Linear):
            return int(proj.out_features)
        out = getattr(getattr(model, "visual", None), "output_dim", None)
        if isinstance(out, int):
            return out
        return int(self.embed_texts(["a photo."]).shape[1])

    def preprocess(self, image: ImageInput) -> torch.Tensor:
        """Decode and validate one image, then apply the model's own eval transform: (3, H, W)."""
        pil = load_image(image)
        tensor: torch.Tensor = self.loaded.preprocess(pil)
        return tensor

    def embed_pixels(self, pixels: torch.Tensor) -> np.ndarray:
        """Embed preprocessed images (N, 3, H, W) -> L2-normalised float32 (N, D)."""
        if pixels.ndim != 4:
            raise ValueError(f"pixels must be (N, 3, H, W), got shape {tuple(pixels.shape)}")
        return self._forward("image", pixels)

    def embed_images(self, images: Sequence[ImageInput]) -> np.ndarray:
        """Embed images from paths, bytes or PIL images -> L2-normalised float32 (N, D)."""
        images = _as_list(images)
        if not images:
            return np.zeros((0, 0), dtype=np.float32)
        return self.embed_pixels(torch.stack([self.preprocess(im) for im in images]))

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Embed texts -> L2-normalised float32 (N, D). Over-long texts are truncated, with a warning."""
        texts = list(texts)
        if not texts:
            return np.zeros((0, 0), dtype=np.float32)
        self._warn_truncation(texts)
        tokens = self.loaded.tokenizer(texts)
        return self._forward("text", tokens)

    def _warn_truncation(self, texts: Sequence[str]) -> None:
        tok: Any = self.loaded.tokenizer
        encode = getattr(tok, "encode", None)
        limit = self.loaded.info.context_length
        if encode is None:
            return
        for t in texts:
            if len(encode(t)) + 2 > limit:
                _logger.warning("text truncated to the model's %d-token context: %.60r", limit, t)

    def class_embeddings(self, labels: Sequence[str], templates: TemplateSet) -> np.ndarray:
        """Per-class text embeddings (C, D): mean of normalised template embeddings, re-normalised."""
        keys = {lab: self._class_key(lab, templates) for lab in labels}
        cached = self.text_cache.get_many(keys.values()) if self.text_cache is not None else {}
        missing = [lab for lab in labels if keys[lab] not in cached]
        if missing:
            prompts = [p for lab in missing for p in templates.fill(lab)]
            emb = self.embed_texts(prompts).astype(np.float64)  # (M*T, D)
            per_class = emb.reshape(len(missing), len(templates.templates), -1).mean(axis=1)
            fresh = _normalise(per_class, "class")
            new = {keys[lab]: fresh[i] for i, lab in enumerate(missing)}
            if self.text_cache is not None:
                self.text_cache.put_many(new)
            cached.update(new)
        return np.stack([cached[keys[lab]] for lab in labels]).astype(np.float32)

    def _class_key(self, label: str, templates: TemplateSet) -> str:
        return hashlib.sha256(f"{self._text_basis()}\0{templates.sha256}\0{label}".encode()).hexdigest()

    def _text_basis(self) -> str:
        """Everything a class embedding depends on besides the text: weights, numerics, shapes."""
        if self._basis is None:
            info = self.loaded.info
            basis = {"numerics": self._numerics_basis(), "tokenizer": info.tokenizer,
                     "context": info.context_length, "text_batch": self.text_micro_batch,
                     "path": self._batch_path("text")}
            self._basis = hashlib.sha256(json.dumps(basis, sort_keys=True).encode()).hexdigest()
        return self._basis

    def _numerics_basis(self) -> str:
        """Weights, code versions and every numerics flag a forward's bits depend on."""
        if self._numerics is None:
            info = self.loaded.info
            flags = self._flags if self._flags is not None else self._read_flags()
            basis = {
                "fingerprint": info.fingerprint, "config": info.config_hash,
                "profile": self.profile.to_dict(), "device": str(self.device), "versions": _versions(),
                "flags": {k: flags.get(k) for k in ("onednn_enabled", "mkl_cbwr_effective", "mkl_cbwr",
                                                    "float32_matmul_precision", "fp32_precision")},
                "cpu": flags.get("build", {}).get("cpu_capability"),
            }
            self._numerics = hashlib.sha256(json.dumps(basis, sort_keys=True, default=str).encode()).hexdigest()
        return self._numerics

    def classify(
        self,
        images: Sequence[ImageInput],
        labels: Sequence[str],
        *,
        templates: str | Sequence[str] | TemplateSet | None = None,
        top_k: int = 5,
        sources: Sequence[str | None] | None = None,
    ) -> list[Classification]:
        """Zero-shot classify images against labels; one :class:`Classification` per image."""
        clean = validate_labels(labels)
        tset = get_template_set(templates)
        classes = self.class_embeddings(clean, tset)
        images = _as_list(images)
        emb = self.embed_images(images)
        if sources is None:
            sources = [str(im) if isinstance(im, str) else None for im in images]
        return self.classify_embeddings(emb, classes, clean, tset, top_k=top_k, sources=sources)

    def classify_embeddings(
        self, image_emb: np.ndarray, class_emb: np.ndarray, labels: Sequence[str], templates: TemplateSet,
        *, top_k: int = 5, sources: Sequence[str | None] | None = None,
    ) -> list[Classification]:
        """The zero-shot head on precomputed embeddings (float64, row-independent)."""
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        scale = float(self.loaded.model.logit_scale.detach().float().exp().cpu())  # type: ignore[operator]
        cls = class_emb.astype(np.float64)
        prov = dataclasses.replace(self.provenance, template_set=templates.name, template_sha256=templates.sha256)
        results = []
        for i, row in enumerate(image_emb.astype(np.float64)):
            logits = (cls * row[None, :]).sum(axis=-1) * scale  # (C,), per-row: independent of N
            probs = _softmax(logits)
            order = np.argsort(-probs, kind="stable")[:top_k]
            src = sources[i] if sources is not None and i < len(sources) else None
            results.append(Classification(
                labels=tuple(labels), probs=tuple(float(p) for p in probs),
                top=tuple((labels[j], float(probs[j])) for j in order), provenance=prov, source=src,
            ))
        return results


def _normalise(x: np.ndarray, what: str) -> np.ndarray:
    """Row-wise L2 normalisation in float64, checked for NaN/Inf; returns float32."""
    if x.size == 0:
        return x.astype(np.float32)
    if not np.isfinite(x).all():
        bad = int((~np.isfinite(x)).any(axis=-1).sum())
        raise NumericsError(
            f"{bad} {what} embedding row(s) contain NaN/Inf; the weights or inputs are broken "
            "(run `steadyclip doctor` to find which)"
        )
    x64 = x.astype(np.float64)
    norms = np.sqrt((x64 * x64).sum(axis=-1, keepdims=True))
    if (norms == 0).any():
        raise NumericsError(f"a {what} embedding is all zeros and cannot be normalised")
    out: np.ndarray = (x64 / norms).astype(np.float32)
    return out


def _as_list(images: Sequence[ImageInput] | ImageInput) -> list[ImageInput]:
    """One image (path, bytes, PIL) or a sequence of them -> a list."""
    if isinstance(images, (str, bytes, bytearray)) or not isinstance(images, Sequence):
        return [images]
    return [cast(ImageInput, im) for im in images]


def _softmax(logits: np.ndarray) -> np.ndarray:
    if not np.isfinite(logits).all():
        raise NumericsError(f"non-finite logits {logits[~np.isfinite(logits)][:3]}; the model is broken")
    z = np.exp(logits - logits.max())
    probs: np.ndarray = z / z.sum()
    if abs(float(probs.sum()) - 1.0) > 1e-5:
        raise NumericsError(f"probabilities sum to {probs.sum()!r}, not 1")
    return probs
