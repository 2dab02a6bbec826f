"""Shared state of one diagnosis: the model, its inputs, the reference result, and how to measure."""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from steadyclip.doctor.harness import (
    Encoded,
    Inputs,
    amp_autocast,
    encode,
    head,
    no_autocast,
)
from steadyclip.doctor.state import ModelSnapshot, eval_temporarily, strict_numerics
from steadyclip.numerics.determinism import thread_count

_logger = logging.getLogger(__name__)

__all__ = ["Context"]


@dataclass
class Context:
    """What every check needs.

    Attributes:
        model: the user's model object (restored at the end).
        fp32: the model itself, or a float32 copy when its weights are half precision.
        inputs: prepared images and label prompts.
        device_type: "cpu" or "cuda" (where the model lives).
        threads: the caller's intra-op thread count (measurements keep it, except thread_variance).
        runs: how many repetitions the user asked for.
        snapshot: the model's state before anything ran.
        amp_in_use: the autocast dtype the user's code runs under, or None.
        ambient_flags: numerics flags in effect when diagnose was called.
        baseline: probabilities in eval, fp32, strict flags, user's pixels: the reference.
        baseline_enc: the embeddings behind ``baseline``.
    """

    model: torch.nn.Module
    fp32: torch.nn.Module
    inputs: Inputs
    device_type: str
    threads: int
    runs: int
    snapshot: ModelSnapshot
    amp_in_use: torch.dtype | None
    ambient_flags: dict[str, Any]
    baseline: np.ndarray | None = None
    baseline_enc: Encoded | None = None
    notes: dict[str, Any] = field(default_factory=dict)

    @contextlib.contextmanager
    def strict(self, threads: int | None = None) -> Iterator[dict[str, Any]]:
        """Eval-grade numerics: strict flags, no autocast, at the caller's thread count unless told."""
        with strict_numerics(self.device_type, threads or self.threads) as flags, no_autocast(self.device_type):
            yield flags

    def eval_encode(self, pixels: torch.Tensor | None = None, model: torch.nn.Module | None = None,
                    threads: int | None = None, **kw: Any) -> Encoded:
        """Embeddings in eval mode, fp32, strict flags; the model's modes are put back afterwards."""
        m = self.fp32 if model is None else model
        px = self.inputs.pixels_user if pixels is None else pixels
        with eval_temporarily(m), self.strict(threads):
            return encode(m, px, self.inputs.tokens, **kw)

    def eval_probs(self, pixels: torch.Tensor | None = None, model: torch.nn.Module | None = None,
                   **kw: Any) -> np.ndarray:
        m = self.fp32 if model is None else model
        return head(m, self.eval_encode(pixels, m, **kw), self.inputs.n_templates)

    def ambient_encode(self, pixels: torch.Tensor | None = None, model: torch.nn.Module | None = None, *,
                       amp: torch.dtype | None = None, threads: int | None = None, **kw: Any) -> Encoded:
        """Eval mode under the caller's own numerics flags (the kernels their code runs), fp32 unless ``amp``."""
        m = self.fp32 if model is None else model
        px = self.inputs.pixels_user if pixels is None else pixels
        cast = amp_autocast(self.device_type, amp) if amp is not None else no_autocast(self.device_type)
        with eval_temporarily(m), cast, thread_count(threads):
            return encode(m, px, self.inputs.tokens, **kw)

    def ambient_probs(self, model: torch.nn.Module | None = None, amp: torch.dtype | None = None) -> np.ndarray:
        m = self.fp32 if model is None else model
        return head(m, self.ambient_encode(model=m, amp=amp), self.inputs.n_templates)

    def compute_baseline(self) -> np.ndarray:
        self.baseline_enc = self.eval_encode()
        self.baseline = head(self.fp32, self.baseline_enc, self.inputs.n_templates)
        return self.baseline

    def restore_weights(self) -> list[str]:
        """Undo what a train-mode forward wrote (BatchNorm statistics) so the next measurement starts clean."""
        return self.snapshot.restore_tensors(self.model)
