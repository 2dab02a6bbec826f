"""Measured drift of reduced precision vs fp32: the figures and how they are computed.

One measurement path for everyone: :func:`compare` turns two sets of embeddings (a
reference and a reduced-precision run of the same inputs) into :class:`DriftFigures`
(min cosine of embeddings, max |delta prob| of the zero-shot head, top-1 agreement).
Probabilities come from the model's own head (:class:`steadyclip.numerics.head.ZeroShotHead`): softmax
for CLIP, per-label sigmoid with ``logit_bias`` for SigLIP, exactly as the engine scores them.
The engine feeds it the behaviour probe under ``strict`` and ``fast`` at first use per
model and stack (:mod:`steadyclip.engine._fast`, which remembers the figures on disk);
``doctor``'s ``precision_drift`` feeds it the user's images and labels.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np

from steadyclip.errors import InputError
from steadyclip.numerics.head import ZeroShotHead

_logger = logging.getLogger(__name__)

__all__ = ["DRIFT_VERSION", "DriftFigures", "compare"]

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
