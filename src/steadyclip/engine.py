"""The inference engine: fixed-shape micro-batches, embeddings, zero-shot classification.

Why fixed shapes: on CPU a row's bits are the same whatever its neighbours *at the same batch
shape* (measured, DESIGN.md), not across shapes. So every forward runs at exactly ``micro_batch``
rows, the tail padded - unless a self-check proves single rows equal to full-batch rows, then
tails run row by row. Why replicas: work beyond one micro-batch goes to K replica processes
(:mod:`steadyclip.replicas`) running the same kernels at the same pinned thread count on the same
shapes, so every K gives the same bits; a replica uses T > 1 threads only where a self-check
proved rows at T equal rows at 1 (:mod:`steadyclip.selfcheck`).
"""
from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any, Literal, Self, TypeVar, overload

import numpy as np
import torch

from steadyclip import determinism, drift, identity, precision, rows, selfcheck
from steadyclip._futures import completed, mapped
from steadyclip.determinism import Profile
from steadyclip.engine_replicas import ReplicaSet
from steadyclip.errors import InputError
from steadyclip.head import ZeroShotHead, embedding_width, normalise
from steadyclip.images import ImageInput, load_image
from steadyclip.layout import ExecutionRecord, check_count
from steadyclip.loading import LoadedModel
from steadyclip.prompts import (
    TemplateSet,
    get_template_set,
    validate_labels,
    warn_truncation,
)
from steadyclip.results import (
    Classification,
    ClassifyReport,
    EmbedReport,
    ImageFailure,
    Provenance,
)
from steadyclip.textcache import TextCache

_logger = logging.getLogger(__name__)

T = TypeVar("T")
BatchInvariance = Literal["auto", "fixed"]
OnError = Literal["raise", "row"]


class Engine:
    """Runs a verified model deterministically, on every core this process may use.

    Args:
        loaded: a model from :func:`steadyclip.load`.
        profile: ``"strict"`` (fp32, bitwise reproducible), ``"fast"``, or a :class:`Profile`.
        micro_batch: rows per image forward; 1 gives the lowest latency.
        text_micro_batch: rows per text forward.
        threads: intra-op threads per replica (default 1). More than 1 is used only where a
            self-check proves rows equal to rows at 1 thread; otherwise 1, logged and recorded.
        replicas: processes running forwards for inputs bigger than one micro-batch (default:
            one per ``threads`` CPUs this process may use; 1 = only this process).
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
        profile: str | Profile = "strict",
        micro_batch: int = 8,
        text_micro_batch: int = 32,
        threads: int | str | None = None,
        replicas: int | str | None = None,
        text_cache: TextCache | str | None = "default",
        batch_invariance: BatchInvariance = "auto",
        onednn: bool | None = None,
        allow_emulated_bf16: bool = False,
    ) -> None:
        check_count("micro_batch", micro_batch, allow_auto=False)
        check_count("text_micro_batch", text_micro_batch, allow_auto=False)
        if batch_invariance not in ("auto", "fixed"):
            raise InputError(f"batch_invariance must be 'auto' or 'fixed', got {batch_invariance!r}")
        self.loaded = loaded
        self.device = next(loaded.model.parameters()).device
        self.profile = determinism.identity_profile(profile, self.device.type, onednn)
        requested = check_count("threads", threads)
        if isinstance(profile, Profile) and requested is None and profile.threads != 1:
            requested = profile.threads
        # fast: a reduced-precision copy cast once (steadyclip.precision); None = run loaded.model (fp32)
        self._cast = precision.prepare(loaded, self.profile, self.device.type, allow_emulated_bf16=allow_emulated_bf16)
        self.micro_batch = micro_batch
        self.text_micro_batch = text_micro_batch
        self.batch_invariance = batch_invariance
        if text_cache == "default":
            self.text_cache: TextCache | None = TextCache()
        elif isinstance(text_cache, str):
            raise InputError(f"text_cache must be 'default', a TextCache or None, got {text_cache!r}")
        else:
            self.text_cache = text_cache
        self._lock = threading.RLock()
        self._paths: dict[str, str] = {}
        self._flags: dict[str, Any] | None = None
        self._basis: str | None = None
        self._numerics: str | None = None
        self._provenance: Provenance | None = None
        self._building = False
        self._replicas = ReplicaSet(self, requested_threads=requested, requested_replicas=check_count(
            "replicas", replicas))
        self.text_forward_rows = 0  # how many text rows the text tower has encoded (cache proof)

    # ---- lifecycle ----------------------------------------------------------------------
    def close(self) -> None:
        """Stop the replica processes (also done when the engine is garbage-collected)."""
        self._replicas.close()

    def start_replicas(self) -> None:
        """Start the replica processes now rather than at the first big call (servers do, at start-up)."""
        if self.replicas > 1:
            self._replicas.pool()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- provenance -------------------------------------------------------------------
    @property
    def provenance(self) -> Provenance:
        """Numerics provenance of results from this engine (built once; self-checks run on first access)."""
        if self._provenance is not None:
            return self._provenance
        self._building = True  # self-checks and drift probes forward in this process, never in replicas
        try:
            return self._build_provenance()
        finally:
            self._building = False

    def use_replicas(self, rows: int, size: int) -> bool:
        """Should ``rows`` inputs at micro-batch ``size`` go to the replicas? (Not while provenance builds.)"""
        return rows > size and not self._building and self._replicas.wanted()

    def _build_provenance(self) -> Provenance:
        with self._lock:
            image_path = self._batch_path("image")
            text_path = self._batch_path("text")
            flags = identity.numerics_flags(self._read_flags())
        info = self.loaded.info
        self._provenance = Provenance(
            model_id=info.model_id, arch=info.arch, weights_sha256=info.weights_sha256,
            fingerprint=info.fingerprint, profile=self.profile.name, precision=self.profile.precision,
            deterministic=self.profile.deterministic_algorithms, device=str(self.device),
            threads=self.profile.threads, micro_batch=self.micro_batch, batch_path=image_path,
            text_micro_batch=self.text_micro_batch, text_batch_path=text_path, flags=flags,
            versions=identity.software_stack(),
            reduced_precision=drift.fast_record(self) if self._cast is not None else None,
        )
        return self._provenance

    @property
    def execution(self) -> ExecutionRecord:
        """How work is laid out on this machine (replicas, threads): speed only, never identity."""
        return self._replicas.record()

    @property
    def threads(self) -> int:
        """Intra-op threads each forward runs at (1, or more where proven not to change a bit)."""
        return self._replicas.threads

    @property
    def replicas(self) -> int:
        """Replica processes used for work bigger than one micro-batch."""
        return self._replicas.count

    def _read_flags(self) -> dict[str, Any]:
        if self._flags is None:
            with determinism.applied(self.profile, self.device.type) as flags:
                self._flags = dict(flags)
        return self._flags

    def run_profile(self) -> Profile:
        """The profile forwards run under: the identity profile at this engine's proven thread count."""
        return dataclasses.replace(self.profile, threads=self.threads)

    # ---- low-level forwards -------------------------------------------------------------
    def tower(self, kind: str) -> tuple[Callable[[torch.Tensor], torch.Tensor], int]:
        """The encode function and micro-batch rows of the ``"image"`` or ``"text"`` tower."""
        model: Any = self.loaded.model if self._cast is None else self._cast.model
        fn, size = (model.encode_image, self.micro_batch) if kind == "image" else (model.encode_text,
                                                                                   self.text_micro_batch)
        if self._cast is not None:
            cast = self._cast.cast_input
            return (lambda x: fn(cast(x))), size  # pixels -> the weights' dtype; outputs go back to float32
        return fn, size

    def check_state(self) -> None:
        """Refuse (or repair, per the guard) a model not in inference state or changed in memory."""
        self.loaded.ensure_inference_state()
        self.loaded.check_buffers()
        if self._cast is not None:
            self._cast.check()

    def _forward(self, kind: str, x: torch.Tensor) -> np.ndarray:
        """Encode rows of ``x`` at the engine's fixed shapes; L2-normalised float32 (N, D)."""
        _, size = self.tower(kind)
        if self.use_replicas(x.shape[0], size):
            raw = self._replicas.forward_async(kind, x).result()
        else:
            raw = self.forward_local(kind, x)
        if kind == "text":
            self.text_forward_rows += int(x.shape[0])
        return normalise(raw, kind)

    def forward_local(self, kind: str, x: torch.Tensor) -> np.ndarray:
        """Encode rows of ``x`` in this process at the fixed shapes; raw float32 (N, D)."""
        fn, size = self.tower(kind)
        with self._lock:
            self.check_state()
            path = self._batch_path(kind)
            outs: list[np.ndarray] = []
            profile = self.run_profile()
            with determinism.applied(profile, self.device.type), torch.inference_mode(), \
                    determinism.autocast(profile, self.device.type):
                for start in range(0, x.shape[0], size):
                    chunk = x[start : start + size].to(self.device)
                    outs.append(selfcheck.run_chunk(fn, chunk, size, path))
        return np.concatenate(outs, axis=0) if outs else np.zeros((0, 0), dtype=np.float32)

    def _batch_path(self, kind: str) -> str:
        """Which batching path a tower uses (self-checked once per model and stack, remembered)."""
        if kind not in self._paths:
            self._paths[kind] = selfcheck.batch_path(self, kind)
        return self._paths[kind]

    def probe_inputs(self, kind: str, size: int) -> torch.Tensor:
        """Fixed pseudo-random inputs of one micro-batch, for self-checks."""
        return selfcheck.probe_inputs(self, kind, size)

    def numerics_basis(self) -> str:
        """Weights, code versions and every numerics flag a forward's bits depend on (one key)."""
        if self._numerics is None:
            info = self.loaded.info
            self._numerics = identity.numerics_key(
                fingerprint=info.fingerprint, config_hash=info.config_hash, profile=self.profile.to_dict(),
                device=str(self.device), flags=self._read_flags())
        return self._numerics

    # ---- public API -------------------------------------------------------------------
    @property
    def embedding_dim(self) -> int:
        """Width D of the joint embedding space, read from the model (no forward) when it says."""
        width = embedding_width(self.loaded.model)
        return width if width is not None else int(self.embed_texts(["a photo."]).shape[1])

    def preprocess(self, image: ImageInput) -> torch.Tensor:
        """Decode and validate one image, then apply the model's own eval transform: (3, H, W)."""
        pil = load_image(image)
        tensor: torch.Tensor = self.loaded.preprocess(pil)
        return tensor

    def embed_pixels(self, pixels: torch.Tensor) -> np.ndarray:
        """Embed preprocessed images (N, 3, H, W) -> L2-normalised float32 (N, D)."""
        if pixels.ndim != 4:
            raise InputError(f"pixels must be (N, 3, H, W), got shape {tuple(pixels.shape)}")
        return self._forward("image", pixels)

    def submit_pixels(self, pixels: torch.Tensor) -> Future[np.ndarray]:
        """:meth:`embed_pixels` without waiting: with replicas, the rows are computed in them (even
        one micro-batch) while the caller goes on; else computed now. Same bits either way."""
        if self._building or not self._replicas.wanted() or pixels.ndim != 4:
            return completed(self.embed_pixels, pixels)
        return mapped(self._replicas.forward_async("image", pixels), lambda raw: normalise(raw, "image"))

    def submit(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        """Run ``fn(engine_copy, *args)`` in a replica (``fn`` a module-level function; pickled args)."""
        return self._replicas.submit(fn, *args)

    @overload
    def embed_images(self, images: Sequence[ImageInput], *, on_error: Literal["raise"] = ...) -> np.ndarray: ...
    @overload
    def embed_images(self, images: Sequence[ImageInput], *, on_error: Literal["row"]) -> EmbedReport: ...

    def embed_images(self, images: Sequence[ImageInput], *, on_error: OnError = "raise") -> np.ndarray | EmbedReport:
        """Embed images from paths, bytes or PIL images -> L2-normalised float32 (N, D).

        ``on_error="row"`` returns an :class:`EmbedReport` with a failure row for each bad
        image instead of raising at the first. Inputs beyond one micro-batch are decoded and
        embedded in the replicas.
        """
        images = rows.as_list(images)
        if on_error not in ("raise", "row"):
            raise InputError(f"on_error must be 'raise' or 'row', got {on_error!r}")
        found = rows.embed_rows(self, images) if images else []
        if on_error == "row":
            return EmbedReport(tuple(found), self.provenance)
        rows.raise_first(found, images)
        return np.stack(found) if found else np.zeros((0, 0), dtype=np.float32)

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Embed texts -> L2-normalised float32 (N, D). Over-long texts are truncated, with a warning."""
        texts = list(texts)
        if not texts:
            return np.zeros((0, 0), dtype=np.float32)
        warn_truncation(self.loaded.tokenizer, texts, self.loaded.info.context_length)
        tokens = self.loaded.tokenizer(texts)
        return self._forward("text", tokens)

    def class_embeddings(self, labels: Sequence[str], templates: TemplateSet) -> np.ndarray:
        """Per-class text embeddings (C, D): mean of normalised template embeddings, re-normalised."""
        keys = {lab: self._class_key(lab, templates) for lab in labels}
        cached = self.text_cache.get_many(keys.values()) if self.text_cache is not None else {}
        missing = [lab for lab in labels if keys[lab] not in cached]
        if missing:
            prompts = [p for lab in missing for p in templates.fill(lab)]
            emb = self.embed_texts(prompts).astype(np.float64)  # (M*T, D)
            per_class = emb.reshape(len(missing), len(templates.templates), -1).mean(axis=1)
            fresh = normalise(per_class, "class")
            new = {keys[lab]: fresh[i] for i, lab in enumerate(missing)}
            if self.text_cache is not None:
                self.text_cache.put_many(new)
            cached.update(new)
        return np.stack([cached[keys[lab]] for lab in labels]).astype(np.float32)

    def _class_key(self, label: str, templates: TemplateSet) -> str:
        return identity.sha256_json([self._text_basis(), templates.sha256, label])

    def _text_basis(self) -> str:
        """Everything a class embedding depends on besides the text: weights, numerics, shapes."""
        if self._basis is None:
            info = self.loaded.info
            self._basis = identity.sha256_json({
                "numerics": self.numerics_basis(), "tokenizer": info.tokenizer, "context": info.context_length,
                "text_batch": self.text_micro_batch, "path": self._batch_path("text")})
        return self._basis

    def classify(
        self,
        images: Sequence[ImageInput],
        labels: Sequence[str],
        *,
        templates: str | Sequence[str] | TemplateSet | None = None,
        top_k: int = 5,
        sources: Sequence[str | None] | None = None,
        on_error: OnError = "raise",
    ) -> Any:
        """Zero-shot classify images against labels; one :class:`Classification` per image.

        ``on_error="row"`` returns a :class:`ClassifyReport` (bad images are failure rows,
        the rest are classified) - the document the CLI prints and the server answers.
        """
        clean = validate_labels(labels)
        tset = get_template_set(self.loaded.default_templates if templates is None else templates)
        classes = self.class_embeddings(clean, tset)
        images = rows.as_list(images)
        report = self.embed_images(images, on_error="row")
        if sources is None:
            sources = [rows.source_name(im) for im in images]
        good = [i for i, r in enumerate(report.rows) if not isinstance(r, ImageFailure)]
        if on_error != "row":
            rows.raise_first(report.rows, images)
        emb = np.stack([report.rows[i] for i in good]) if good else np.zeros((0, classes.shape[1]), np.float32)
        done = iter(self.classify_embeddings(emb, classes, clean, tset, top_k=top_k,
                                             sources=[sources[i] for i in good]))
        if on_error != "row":
            return list(done)
        prov = dataclasses.replace(self.provenance, template_set=tset.name, template_sha256=tset.sha256)
        out = tuple(r if isinstance(r, ImageFailure) else next(done) for r in report.rows)
        return ClassifyReport(out, prov)

    def classify_embeddings(
        self, image_emb: np.ndarray, class_emb: np.ndarray, labels: Sequence[str], templates: TemplateSet,
        *, top_k: int = 5, sources: Sequence[str | None] | None = None,
    ) -> list[Classification]:
        """The zero-shot head (:mod:`steadyclip.head`) on precomputed embeddings (float64, per row)."""
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise InputError(f"top_k must be an int >= 1, got {top_k!r}")
        head = ZeroShotHead.from_model(self.loaded.model)
        prov = dataclasses.replace(self.provenance, template_set=templates.name, template_sha256=templates.sha256)
        results = []
        for i, (probs, order) in enumerate(head.ranked(image_emb, class_emb, top_k)):
            src = sources[i] if sources is not None and i < len(sources) else None
            results.append(Classification(labels=tuple(labels), probs=tuple(float(p) for p in probs), source=src,
                                          top=tuple((labels[j], float(probs[j])) for j in order), provenance=prov))
        return results
