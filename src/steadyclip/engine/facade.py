"""The inference engine: fixed-shape micro-batches, embeddings, zero-shot classification.

:class:`Engine` is a facade over the forward core (:mod:`steadyclip.engine._core`: the model at
fixed shapes under one profile, its self-checks) and the replica set
(:mod:`steadyclip.engine._replicas`: work beyond one micro-batch goes to K forked copies of the
core, running the same kernels at the same pinned thread count on the same shapes, so every K
gives the same bits). It adds what users touch: inputs in, rows and reports out, provenance.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any, Literal, Self, TypeVar, overload

import numpy as np
import torch

from steadyclip._util.digest import sha256_json
from steadyclip._util.futures import completed, mapped
from steadyclip.engine import _rows as rows
from steadyclip.engine._fast import fast_record
from steadyclip.engine._remote import RemoteCore, make_core, portable_proof
from steadyclip.engine._replicas import ReplicaSet
from steadyclip.engine.images import ImageInput
from steadyclip.engine.layout import ExecutionRecord
from steadyclip.engine.outcome import ImageOutcome
from steadyclip.engine.precision import CastModel
from steadyclip.engine.prompts import (
    TemplateSet,
    get_template_set,
    validate_labels,
    warn_truncation,
)
from steadyclip.engine.settings import BatchInvariance, EngineSettings
from steadyclip.engine.text_shapes import TextShapes
from steadyclip.engine.textcache import TextCache
from steadyclip.errors import InputError
from steadyclip.model.loading import LoadedModel
from steadyclip.numerics import identity
from steadyclip.numerics.head import ZeroShotHead, embedding_width, normalise
from steadyclip.numerics.profiles import Profile
from steadyclip.results import (
    Classification,
    ClassifyReport,
    EmbedReport,
    Provenance,
)

_logger = logging.getLogger(__name__)

T = TypeVar("T")
OnError = Literal["raise", "row"]
__all__ = ["BatchInvariance", "Engine", "OnError"]


class Engine:
    """Runs a verified model deterministically, on every core this process may use.

    Args:
        loaded: a model from :func:`steadyclip.load`.
        settings: an :class:`~steadyclip.engine.settings.EngineSettings`; the keyword arguments
            below override its fields (``Engine(loaded, micro_batch=1)`` is the usual spelling).
        profile: ``"strict"`` (fp32, bitwise reproducible), ``"fast"``, or a :class:`Profile`.
        micro_batch: rows per image forward; 1 gives the lowest latency.
        text_micro_batch: rows per text forward at every text bucket (larger forwards of its multiples
            run only where a self-check proves they give the same bits).
        threads: intra-op threads per replica (default 1). More than 1 is used only where a
            self-check proves rows equal to rows at 1 thread; otherwise 1, logged and recorded.
        replicas: processes running forwards for inputs bigger than one micro-batch (default:
            one per ``threads`` CPUs this process may use; 1 = only this process).
        text_cache: ``"default"`` (on-disk, shared), a :class:`TextCache`, or ``None``.
        batch_invariance: ``"auto"`` self-checks and may skip padding; ``"fixed"`` always pads.
        onednn: oneDNN convolutions (see :func:`steadyclip.numerics.determinism.get_profile`); strict default off.
        allow_emulated_bf16: run ``fast`` (bf16) on a CPU without native bf16 anyway (slower than strict;
            recorded in provenance). See :mod:`steadyclip.engine.precision`.
        text_buckets: text sequence lengths (:mod:`steadyclip.engine.text_shapes`): ``"auto"``, ``"full"``.

    Example:
        >>> engine = Engine(steadyclip.load())
        >>> engine.classify(["examples/red_circle.png"], ["red circle", "blue square"])[0].label
        'red circle'
    """

    def __init__(
        self,
        loaded: LoadedModel,
        settings: EngineSettings | None = None,
        *,
        text_cache: TextCache | str | None = "default",
        profile: str | Profile | None = None,
        micro_batch: int | None = None,
        text_micro_batch: int | None = None,
        threads: int | str | None = None,
        replicas: int | str | None = None,
        batch_invariance: BatchInvariance | None = None,
        onednn: bool | None = None,
        allow_emulated_bf16: bool | None = None,
        text_buckets: tuple[int, ...] | str | None = None,
    ) -> None:
        given = {"profile": profile, "micro_batch": micro_batch, "text_micro_batch": text_micro_batch,
                 "threads": threads, "replicas": replicas, "batch_invariance": batch_invariance,
                 "onednn": onednn, "allow_emulated_bf16": allow_emulated_bf16, "text_buckets": text_buckets}
        base = settings if settings is not None else EngineSettings()
        if not isinstance(base, EngineSettings):
            raise InputError(f"settings must be an EngineSettings, got {type(base).__name__}")
        self.settings = base.replace(**{k: v for k, v in given.items() if v is not None})
        self.loaded = loaded
        self._core = make_core(loaded, self.settings)
        if isinstance(self._core, RemoteCore):
            self.settings = self._core.settings = self.settings.replace(replicas=1)  # one worker does the forwards
        self.device = self._core.device
        self.profile = self._core.profile
        if text_cache == "default":
            self.text_cache: TextCache | None = TextCache()
        elif isinstance(text_cache, str):
            raise InputError(f"text_cache must be 'default', a TextCache or None, got {text_cache!r}")
        else:
            self.text_cache = text_cache
        self._basis: str | None = None
        self._provenance: Provenance | None = None
        self._replicas = ReplicaSet(self._core, prepare=lambda: self.provenance)
        self.text_forward_rows = 0  # how many text rows the text tower has encoded (cache proof)

    # ---- lifecycle ----------------------------------------------------------------------
    def close(self) -> None:
        """Stop the replica processes (also done when the engine is garbage-collected)."""
        self._replicas.close()
        self._core.close()

    def start_replicas(self) -> None:
        """Start the replica processes now rather than at the first big call (servers do, at start-up)."""
        if self.replicas > 1:
            self._replicas.pool()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- settings and provenance ----------------------------------------------------------
    @property
    def micro_batch(self) -> int:
        return self.settings.micro_batch

    @property
    def text_micro_batch(self) -> int:
        return self.settings.text_micro_batch

    @property
    def batch_invariance(self) -> BatchInvariance:
        return self.settings.batch_invariance

    @property
    def provenance(self) -> Provenance:
        """Numerics provenance of results from this engine (built once; self-checks run on first access)."""
        if self._provenance is None:
            core = self._core
            with core.lock:
                paths = core.batch_path("image"), core.batch_path("text")
                flags = identity.numerics_flags(core.flags())
                if self.profile.name == "portable":  # refuses here when this CPU computes other bits
                    flags["portable_proof"] = portable_proof(core)
            info = self.loaded.info
            self._provenance = Provenance(
                model_id=info.model_id, arch=info.arch, weights_sha256=info.weights_sha256,
                fingerprint=info.fingerprint, profile=self.profile.name, precision=self.profile.precision,
                deterministic=self.profile.deterministic_algorithms, device=str(self.device),
                threads=core.threads, micro_batch=self.micro_batch, batch_path=paths[0],
                text_micro_batch=self.text_micro_batch, text_batch_path=paths[1],
                text_buckets=core.text_shapes.scheme, flags=flags,
                versions=identity.software_stack(),
                reduced_precision=fast_record(core) if core.cast is not None else None,
            )
        return self._provenance

    @property
    def execution(self) -> ExecutionRecord:
        """How work is laid out on this machine (replicas, threads): speed only, never identity."""
        return self._replicas.record()

    @property
    def threads(self) -> int:
        """Intra-op threads each forward runs at (1, or more where proven not to change a bit)."""
        return self._core.threads

    @property
    def replicas(self) -> int:
        """Replica processes used for work bigger than one micro-batch."""
        return self._replicas.count

    def replica_pids(self) -> list[int]:
        """Process ids of the running replicas (for monitoring); ``[]`` until they start (see :meth:`start_replicas`)."""
        return self._replicas.pids()

    @property
    def text_shapes(self) -> TextShapes:
        """The sequence-length buckets texts run at (:mod:`steadyclip.engine.text_shapes`)."""
        return self._core.text_shapes

    @property
    def cast(self) -> CastModel | None:
        """The reduced-precision copy of the weights the fast profile runs (``None``: fp32, the loaded model)."""
        return self._core.cast

    def numerics_basis(self) -> str:
        """Weights, code versions and every numerics flag a forward's bits depend on (one key)."""
        return self._core.numerics_basis()

    def check_state(self) -> None:
        """Refuse (or repair, per the guard) a model not in inference state or changed in memory."""
        self._core.check_state()

    # ---- forwards -------------------------------------------------------------------------
    def _forward(self, kind: str, x: torch.Tensor) -> np.ndarray:
        """Encode rows of ``x`` at the engine's fixed shapes; L2-normalised float32 (N, D)."""
        if self._replicas.use_for(x.shape[0], kind):
            _ = self.provenance  # self-checks and drift run here, before the replicas fork
            raw = self._replicas.forward_async(kind, x).result()
        else:
            raw = self._core.forward_local(kind, x)
        if kind == "text":
            self.text_forward_rows += int(x.shape[0])
        return normalise(raw, kind)

    def submit(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        """Run ``fn(core_copy, *args)`` in a replica (``fn`` a module-level function; pickled args).

        ``core_copy`` is the replica's forked :class:`~steadyclip.engine._core.ForwardCore`:
        ``core.preprocess(image)``, ``core.embed_local("image", pixels)``.
        """
        return self._replicas.submit(fn, *args)

    def embed_uploads(self, datas: Sequence[bytes], max_pixels: int | None) -> Future[list[ImageOutcome]]:
        """Decode, preprocess and embed uploaded image bytes in the replicas (the server's path)."""
        return rows.embed_uploads(self._replicas, datas, max_pixels)

    # ---- public API -------------------------------------------------------------------
    @property
    def embedding_dim(self) -> int:
        """Width D of the joint embedding space, read from the model (no forward) when it says."""
        width = embedding_width(self.loaded.model)
        return width if width is not None else int(self.embed_texts(["a photo."]).shape[1])

    def preprocess(self, image: ImageInput) -> torch.Tensor:
        """Decode and validate one image, then apply the model's own eval transform: (3, H, W)."""
        return self._core.preprocess(image)

    def embed_pixels(self, pixels: torch.Tensor) -> np.ndarray:
        """Embed preprocessed images (N, 3, H, W) -> L2-normalised float32 (N, D)."""
        if pixels.ndim != 4:
            raise InputError(f"pixels must be (N, 3, H, W), got shape {tuple(pixels.shape)}")
        return self._forward("image", pixels)

    def submit_pixels(self, pixels: torch.Tensor) -> Future[np.ndarray]:
        """:meth:`embed_pixels` without waiting: with replicas, the rows are computed in them (even
        one micro-batch) while the caller goes on; else computed now. Same bits either way."""
        if not self._replicas.wanted() or pixels.ndim != 4:
            return completed(self.embed_pixels, pixels)
        _ = self.provenance
        return mapped(self._replicas.forward_async("image", pixels), lambda raw: normalise(raw, "image"))

    def submit_texts(self, texts: Sequence[str]) -> Future[np.ndarray]:
        """:meth:`embed_texts` without waiting: with replicas, the rows are computed in them (even one
        micro-batch, grouped by sequence-length bucket) while the caller goes on; else computed now.
        Same bits either way."""
        texts = list(texts)
        if not texts or not self._replicas.wanted():
            return completed(self.embed_texts, texts)
        tokens = self._tokens(texts)
        _ = self.provenance
        self.text_forward_rows += len(texts)
        # one replica's share: the server's batcher sends one micro-batch per replica, and keeps them all busy
        return mapped(self._replicas.forward_async("text", tokens, spread=1), lambda raw: normalise(raw, "text"))

    def _tokens(self, texts: list[str]) -> torch.Tensor:
        warn_truncation(self.loaded.tokenizer, texts, self.loaded.info.context_length)
        tokens: torch.Tensor = self.loaded.tokenizer(texts)  # (N, context)
        return tokens

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
        if on_error not in ("raise", "row"):
            raise InputError(f"on_error must be 'raise' or 'row', got {on_error!r}")
        found = self._outcomes(rows.as_list(images))
        if on_error == "row":
            return EmbedReport(rows.report_rows(found), self.provenance)
        rows.raise_first(found)
        return rows.embeddings(found)

    def _outcomes(self, images: list[ImageInput]) -> list[ImageOutcome]:
        """One outcome per input, embedded where it decoded."""
        if images and self._replicas.use_for(len(images)):
            _ = self.provenance  # self-checks and drift run here, before the replicas fork
        return rows.image_outcomes(self._replicas, images) if images else []

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Embed texts -> L2-normalised float32 (N, D). Over-long texts are truncated, with a warning."""
        texts = list(texts)
        if not texts:
            return np.zeros((0, 0), dtype=np.float32)
        return self._forward("text", self._tokens(texts))

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
        return sha256_json([self._text_basis(), templates.sha256, label])

    def _text_basis(self) -> str:
        """Everything a class embedding depends on besides the text: weights, numerics, shapes."""
        if self._basis is None:
            info = self.loaded.info
            self._basis = sha256_json({
                "numerics": self.numerics_basis(), "tokenizer": info.tokenizer, "context": info.context_length,
                "text_batch": self.text_micro_batch, "path": self._core.batch_path("text"),
                "buckets": self._core.text_shapes.scheme})
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
        found = self._outcomes(images)
        if sources is None:
            sources = [rows.source_name(im) for im in images]
        if on_error != "row":
            rows.raise_first(found)
        good = [o for o in found if o.ok]
        emb = rows.embeddings(good, classes.shape[1])  # (N, D)
        done = iter(self.classify_embeddings(emb, classes, clean, tset, top_k=top_k,
                                             sources=[sources[o.index] for o in good]))
        if on_error != "row":
            return list(done)
        prov = dataclasses.replace(self.provenance, template_set=tset.name, template_sha256=tset.sha256)
        out = tuple(next(done) if o.ok else o.failure() for o in found)
        return ClassifyReport(out, prov)

    def classify_embeddings(
        self, image_emb: np.ndarray, class_emb: np.ndarray, labels: Sequence[str], templates: TemplateSet,
        *, top_k: int = 5, sources: Sequence[str | None] | None = None,
    ) -> list[Classification]:
        """The zero-shot head (:mod:`steadyclip.numerics.head`) on precomputed embeddings (float64, per row)."""
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

