"""The engine's start-up self-checks and their remembered verdicts (a JSON map in the cache dir).

Two questions, each answered once per model, profile, stack and shape, then remembered:
- **batch path**: are single-row forwards bitwise equal to the rows of a full
  micro-batch? If so, tails run row by row ("verified-invariant"), else padded
  to the fixed shape ("fixed-shape").
- **threads**: are rows at T intra-op threads bitwise equal to rows at 1 thread?
  Only then may a replica use T threads; otherwise it runs 1 and the machine's
  cores go to more replicas. Thread invariance is a property of model x precision
  x machine (ViT-B-32 fp32 yes, RN50 no, on one Xeon): measured, never assumed.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch

from steadyclip import determinism
from steadyclip.cachedir import VerdictStore
from steadyclip.determinism import Profile

if TYPE_CHECKING:
    from steadyclip.engine import Engine

_logger = logging.getLogger(__name__)

__all__ = ["SelfCheckStore", "batch_path", "probe_inputs", "rows_equal_single", "rows_equal_threads", "run_chunk"]

Forward = Callable[[torch.Tensor], torch.Tensor]


class SelfCheckStore(VerdictStore):
    """The self-check verdicts (``batch-selfcheck.json``); each verdict is a string."""

    def __init__(self) -> None:
        super().__init__("batch-selfcheck")

    def get(self, key: str) -> str | None:
        value = super().get(key)
        return value if isinstance(value, str) else None


def _run(fn: Forward, x: torch.Tensor, profile: Profile, device: str) -> np.ndarray:
    with determinism.applied(profile, device), torch.inference_mode(), determinism.autocast(profile, device):
        out: np.ndarray = fn(x).float().cpu().numpy()
    return out


def rows_equal_single(fn: Forward, probe: torch.Tensor, profile: Profile, device: str) -> bool:
    """Are single-row forwards of the first and last probe rows bitwise equal to the full batch's rows?"""
    full = _run(fn, probe, profile, device)
    rows = [0, probe.shape[0] - 1]
    return all(np.array_equal(full[i], _run(fn, probe[i : i + 1], profile, device)[0]) for i in rows)


def rows_equal_threads(fn: Forward, probe: torch.Tensor, profile: Profile, device: str, threads: int,
                       baseline: int = 1) -> bool:
    """Are the probe's rows at ``threads`` intra-op threads bitwise equal to its rows at ``baseline``?"""
    base = _run(fn, probe, dataclasses.replace(profile, threads=baseline), device)
    other = _run(fn, probe, dataclasses.replace(profile, threads=threads), device)
    return bool(np.array_equal(base, other))


def probe_inputs(engine: Engine, kind: str, size: int) -> torch.Tensor:
    """Fixed pseudo-random inputs of one micro-batch of ``engine``'s image or text tower."""
    gen = torch.Generator().manual_seed(1234)
    if kind == "image":
        h, w = engine.loaded.info.preprocess.size
        return torch.randn((size, 3, h, w), generator=gen).to(engine.device)
    texts = [f"a photo of probe number {i}." for i in range(size)]
    tokens: torch.Tensor = engine.loaded.tokenizer(texts)
    return tokens.to(engine.device)


def batch_path(engine: Engine, kind: str) -> str:
    """``"verified-invariant"`` or ``"fixed-shape"`` for a tower of ``engine``, remembered on disk.

    The key names everything the verdict depends on (weights, code versions,
    numerics flags, CPU, shape), so a warm start does not pay for the check again.
    """
    from steadyclip import identity

    fn, size = engine.tower(kind)
    if size == 1 or engine.batch_invariance == "fixed":
        path = "fixed-shape"
    else:
        key = identity.sha256_json(["batch-path", engine.numerics_basis(), kind, size])
        store = SelfCheckStore()
        remembered = store.get(key)
        if remembered in ("fixed-shape", "verified-invariant"):
            path = remembered
        else:
            same = rows_equal_single(fn, engine.probe_inputs(kind, size), engine.profile, engine.device.type)
            path = "verified-invariant" if same else "fixed-shape"
            store.put(key, path)
    _logger.info("%s tower batch path: %s (micro-batch %d)", kind, path, size)
    return path


def run_chunk(fn: Callable[[torch.Tensor], torch.Tensor], chunk: torch.Tensor, size: int, path: str) -> np.ndarray:
    """One micro-batch of ``chunk`` at the fixed shape ``size``: padded, or row by row where proven equal."""
    n = chunk.shape[0]
    if n == size:
        out: np.ndarray = fn(chunk).float().cpu().numpy()
        return out
    if path == "verified-invariant":
        return np.concatenate([fn(chunk[i : i + 1]).float().cpu().numpy() for i in range(n)], axis=0)
    pad = torch.zeros((size - n, *chunk.shape[1:]), dtype=chunk.dtype, device=chunk.device)
    padded: np.ndarray = fn(torch.cat([chunk, pad], dim=0)).float().cpu().numpy()
    return padded[:n]  # (size, D) -> (n, D)
