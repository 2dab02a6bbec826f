"""Measured drift of reduced precision vs fp32, and whether rows depend on the thread count.

One measurement path for everyone: :func:`compare` turns two sets of embeddings (a
reference and a reduced-precision run of the same inputs) into :class:`DriftFigures`
(min cosine of embeddings, max |delta prob| of the zero-shot head, top-1 agreement).
Probabilities come from the model's own head (:class:`steadyclip.head.ZeroShotHead`): softmax
for CLIP, per-label sigmoid with ``logit_bias`` for SigLIP, exactly as the engine scores them.
The engine feeds it the behaviour probe under ``strict`` and ``fast`` at first use per
model and stack (:func:`engine_drift`); ``doctor``'s ``precision_drift`` feeds it the
user's images and labels. Verdicts are remembered on disk (:class:`steadyclip.cachedir.VerdictStore`),
keyed by everything the numbers depend on, like the batch self-check's.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from steadyclip import determinism, identity, selfcheck
from steadyclip.cachedir import VerdictStore
from steadyclip.errors import InputError
from steadyclip.head import ZeroShotHead
from steadyclip.layout import usable_cpus

if TYPE_CHECKING:
    from steadyclip.engine import Engine

_logger = logging.getLogger(__name__)

__all__ = ["DRIFT_VERSION", "DriftFigures", "compare", "engine_drift", "fast_record", "thread_verdict"]

DRIFT_VERSION = 2  # 2: probabilities from the model's head (SigLIP's sigmoid), not always softmax


@dataclasses.dataclass(frozen=True)
class DriftFigures:
    """How far a reduced-precision run is from the fp32 reference, on the same inputs."""

    min_cosine_image: float  # min over images of cos(reference row, reduced row)
    min_cosine_text: float
    max_abs_prob: float  # max over (image, label) of |p_ref - p_reduced|, the model's zero-shot head
    top1_agreement: float  # fraction of images whose top-1 label is the same
    images: int
    labels: int
    reference: str = "strict (fp32)"
    inputs: str = "behaviour probe"

    @property
    def min_cosine(self) -> float:
        return min(self.min_cosine_image, self.min_cosine_text)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "min_cosine": self.min_cosine}

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> DriftFigures:
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in doc.items() if k in fields})


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    den = np.linalg.norm(a64, axis=-1) * np.linalg.norm(b64, axis=-1)
    out: np.ndarray = (a64 * b64).sum(-1) / den
    return out


def compare(ref_images: np.ndarray, ref_texts: np.ndarray, images: np.ndarray, texts: np.ndarray, *,
            head: ZeroShotHead, reference: str = "strict (fp32)", inputs: str = "behaviour probe") -> DriftFigures:
    """Drift of (``images``, ``texts``) from the reference embeddings; texts are the class embeddings.

    Each side's probabilities use its own embeddings (the fast head sees fast texts) and the
    model's ``head`` (``ZeroShotHead.from_model``), so a SigLIP model is scored by its sigmoid.

    Raises:
        InputError: the two runs' embeddings differ in shape (not the same inputs).
        NumericsError: non-finite logits (from ``head``).
    """
    if ref_images.shape != images.shape or ref_texts.shape != texts.shape:
        raise InputError(f"cannot compare embeddings of shapes {ref_images.shape}/{ref_texts.shape} with "
                         f"{images.shape}/{texts.shape}: drift compares two runs of the same images and texts")
    p_ref, p = head.probs_rows(ref_images, ref_texts), head.probs_rows(images, texts)  # (N, C) each
    agree = float((p_ref.argmax(-1) == p.argmax(-1)).mean()) if p.shape[0] else 1.0
    return DriftFigures(
        min_cosine_image=float(_cosines(ref_images, images).min(initial=1.0)),
        min_cosine_text=float(_cosines(ref_texts, texts).min(initial=1.0)),
        max_abs_prob=float(np.abs(p_ref - p).max(initial=0.0)), top1_agreement=agree,
        images=int(images.shape[0]), labels=int(texts.shape[0]), reference=reference, inputs=inputs)


def fast_record(fast: Engine) -> dict[str, Any]:
    """``Provenance.reduced_precision`` of a fast engine: the cast, the CPU's bf16 support, drift, threads."""
    assert fast._cast is not None, "fast_record is for engines running a reduced-precision copy"
    # the fp32 twin: same model, shapes and threads (type(fast): no import of engine from below it)
    strict = type(fast)(fast.loaded, profile="strict", micro_batch=fast.micro_batch,
                        text_micro_batch=fast.text_micro_batch, threads=fast.profile.threads, replicas=1,
                        text_cache=None, batch_invariance=fast.batch_invariance)
    fn, size = fast.tower("image")
    threads = thread_verdict(fn, fast.probe_inputs("image", size), fast.profile, fast.device.type,
                             fast.numerics_basis())
    return {**fast._cast.record, "drift_vs_strict": engine_drift(fast, strict).to_dict(), "threads": threads}


def engine_drift(fast: Engine, strict: Engine) -> DriftFigures:
    """The behaviour probe under both profiles -> drift figures; measured once per model and stack.

    ``strict`` is an fp32 engine on the same loaded model, micro-batch and threads.
    """
    from steadyclip.probe import PROBE_TEXTS, probe_images

    key = identity.sha256_json([DRIFT_VERSION, fast.numerics_basis(), strict.numerics_basis(), fast.micro_batch,
                                fast.text_micro_batch])
    store = VerdictStore("precision-drift")
    remembered = store.get(key)
    if isinstance(remembered, dict):
        try:
            return DriftFigures.from_dict(remembered)
        except TypeError:
            _logger.info("ignoring an unreadable remembered drift entry; measuring again")
    images = probe_images(fast.loaded.info.preprocess.size)
    pixels = torch.stack([fast.preprocess(im) for im in images])  # (6, 3, H, W)
    texts = list(PROBE_TEXTS)
    figures = compare(strict.embed_pixels(pixels), strict.embed_texts(texts), fast.embed_pixels(pixels),
                      fast.embed_texts(texts), head=ZeroShotHead.from_model(fast.loaded.model))
    _logger.info("fast vs strict drift on the probe: min cosine %.6f, max |dp| %.3g, top-1 agreement %.3f",
                 figures.min_cosine, figures.max_abs_prob, figures.top1_agreement)
    store.put(key, figures.to_dict())
    return figures


def thread_verdict(fn: Callable[[torch.Tensor], torch.Tensor], probe: torch.Tensor, profile: determinism.Profile,
                   device: str, basis: str) -> dict[str, Any]:
    """Are rows bitwise the same at the pinned thread count and another one? Remembered on disk.

    Returns ``{"verdict": "thread-invariant" | "thread-dependent" | "not-applicable", "compared": [...],
    "pinned": threads}``. The engine pins ``profile.threads`` either way; the verdict says whether
    that pin is what keeps rows stable.
    """
    cpus = usable_cpus()
    mine = profile.threads
    other = mine + 1 if mine < cpus else mine - 1
    if device != "cpu" or other < 1:
        return {"verdict": "not-applicable", "compared": [mine], "pinned": mine,
                "why": "not a CPU run" if device != "cpu" else "only one CPU"}
    key = identity.sha256_json([DRIFT_VERSION, "threads", basis, mine, other, list(probe.shape)])
    store = VerdictStore("thread-selfcheck")
    remembered = store.get(key)
    if isinstance(remembered, dict):
        return remembered
    same = selfcheck.rows_equal_threads(fn, probe, profile, device, other, baseline=mine)
    verdict = {"verdict": "thread-invariant" if same else "thread-dependent", "compared": [mine, other],
               "pinned": mine}
    _logger.info("rows at %d vs %d threads: %s; threads pinned at %d", mine, other, verdict["verdict"], mine)
    store.put(key, verdict)
    return verdict
