"""The one zero-shot head: embeddings -> per-label probabilities, for CLIP and SigLIP alike.

CLIP (softmax over labels)::   p = softmax(exp(t) * <img, txt_c>)
SigLIP (independent sigmoids)::  p_c = sigmoid(exp(t) * <img, txt_c> + b)

``t`` is the model's learned ``logit_scale`` and ``b`` its ``logit_bias``; a model
with a ``logit_bias`` is a SigLIP model (open_clip's convention). Computed per row
in float64, so a row's probabilities never depend on how many images came with it.
The engine and doctor both use this module, so they report the same numbers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from steadyclip.errors import NumericsError

__all__ = ["ZeroShotHead", "embedding_width", "normalise"]


@dataclass(frozen=True)
class ZeroShotHead:
    """Scale and (SigLIP) bias read from a model; ``probs`` maps one image row to label probabilities."""

    scale: float  # exp(logit_scale)
    bias: float | None = None  # SigLIP's logit_bias; None for CLIP

    @classmethod
    def from_model(cls, model: Any) -> ZeroShotHead:
        """Read ``logit_scale`` (and ``logit_bias`` when present) from an open_clip model."""
        scale_param = getattr(model, "logit_scale", None)
        if scale_param is None:
            raise NumericsError("the model has no logit_scale: it is not a CLIP/SigLIP model open_clip can score")
        scale = float(scale_param.detach().float().exp().cpu())  # as open_clip computes it
        bias_param = getattr(model, "logit_bias", None)
        bias = None if bias_param is None else float(bias_param.detach().double().cpu())
        return cls(scale=scale, bias=bias)

    @property
    def kind(self) -> str:
        """``"sigmoid"`` (SigLIP: labels scored independently) or ``"softmax"`` (CLIP)."""
        return "softmax" if self.bias is None else "sigmoid"

    def logits(self, image_row: np.ndarray, class_emb: np.ndarray) -> np.ndarray:
        """(D,) and (C, D) normalised embeddings -> (C,) logits, float64."""
        cls = class_emb.astype(np.float64)
        row = image_row.astype(np.float64)
        out: np.ndarray = (cls * row[None, :]).sum(axis=-1) * self.scale  # (C,)
        if self.bias is not None:
            out = out + self.bias
        return out

    def probs(self, image_row: np.ndarray, class_emb: np.ndarray) -> np.ndarray:
        """(D,) and (C, D) normalised embeddings -> (C,) probabilities, float64, checked."""
        logits = self.logits(image_row, class_emb)
        if not np.isfinite(logits).all():
            raise NumericsError(f"non-finite logits {logits[~np.isfinite(logits)][:3]}; the model is broken")
        if self.bias is not None:
            return _sigmoid(logits)
        z = np.exp(logits - logits.max())
        probs: np.ndarray = z / z.sum()
        if abs(float(probs.sum()) - 1.0) > 1e-5:
            raise NumericsError(f"probabilities sum to {probs.sum()!r}, not 1")
        return probs

    def probs_rows(self, image_emb: np.ndarray, class_emb: np.ndarray) -> np.ndarray:
        """(N, D) and (C, D) normalised embeddings -> (N, C) probabilities, each row on its own (``probs``)."""
        out = np.empty((image_emb.shape[0], class_emb.shape[0]))  # (N, C), float64
        for i, row in enumerate(image_emb):
            out[i] = self.probs(row, class_emb)  # per-row: independent of N
        return out

    def ranked(self, image_emb: np.ndarray, class_emb: np.ndarray, top_k: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per image row: its (C,) probabilities and the indices of its ``top_k`` labels (stable order)."""
        return [(probs, np.argsort(-probs, kind="stable")[:top_k]) for probs in self.probs_rows(image_emb, class_emb)]


def _sigmoid(x: np.ndarray) -> np.ndarray:
    out: np.ndarray = np.where(x >= 0, 1.0 / (1.0 + np.exp(-np.abs(x))), np.exp(-np.abs(x)) / (1.0 + np.exp(-np.abs(x))))
    return out


def embedding_width(model: Any) -> int | None:
    """Width D of a CLIP model's joint embedding space, from its projection; None when it does not say."""
    import torch

    proj = getattr(model, "text_projection", None)
    if isinstance(proj, torch.Tensor) and proj.ndim == 2:
        return int(proj.shape[1])
    if isinstance(proj, torch.nn.Linear):
        return int(proj.out_features)
    out = getattr(getattr(model, "visual", None), "output_dim", None)
    return out if isinstance(out, int) else None


def normalise(x: np.ndarray, what: str) -> np.ndarray:
    """Row-wise L2 normalisation in float64, checked for NaN/Inf and zero rows; returns float32."""
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
