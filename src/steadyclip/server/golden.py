"""The golden self-check behind ``/readyz``: a fixed probe image whose embedding must not change.

At start-up the server embeds a synthetic image (built from arithmetic alone,
no RNG, no file) through exactly the path requests take, and keeps the
float32 result. Each readiness probe recomputes it and compares *bitwise*:
any drift - weights changed in memory, a thread-count or flag change, a
batching bug - turns the server unready instead of quietly changing answers.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

import numpy as np
from PIL import Image

_logger = logging.getLogger(__name__)

PROBE_SIZE = (96, 80)  # (W, H): not square, so resize and crop both do work
PROBE_DESCRIPTION = "synthetic 96x80 RGB pattern (gradients + xor texture), built in code"


def probe_image() -> Image.Image:
    """The deterministic probe: the same pixels on every machine and run."""
    w, h = PROBE_SIZE
    y, x = np.mgrid[0:h, 0:w]  # (H, W) each
    r = (x * 255) // (w - 1)
    g = (y * 255) // (h - 1)
    b = ((x ^ y) * 37) % 256
    rgb = np.stack([r, g, b], axis=-1).astype(np.uint8)  # (H, W, 3)
    return Image.fromarray(rgb, mode="RGB")


def digest(arr: np.ndarray) -> str:
    """SHA-256 of an array's dtype, shape and raw bytes."""
    h = hashlib.sha256(f"{arr.dtype.str}{arr.shape}".encode())
    h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


@dataclass
class Golden:
    """The stored reference embedding of the probe (set once, at start-up)."""

    reference: np.ndarray | None = None
    error: str | None = None  # why the reference could not be computed

    @property
    def digest(self) -> str | None:
        return digest(self.reference) if self.reference is not None else None

    def compare(self, fresh: np.ndarray) -> str | None:
        """``None`` when ``fresh`` is bitwise the reference, else a description of the difference."""
        if self.reference is None:
            return f"no golden reference was recorded at start-up ({self.error or 'still starting'})"
        if fresh.dtype != self.reference.dtype or fresh.shape != self.reference.shape:
            return (f"probe embedding changed type/shape: {fresh.dtype}{fresh.shape} vs "
                    f"{self.reference.dtype}{self.reference.shape}")
        if fresh.tobytes() == self.reference.tobytes():
            return None
        diff = np.abs(fresh.astype(np.float64) - self.reference.astype(np.float64))
        return (f"probe embedding differs from the start-up reference in {int((diff > 0).sum())} of {diff.size} "
                f"values (max abs diff {float(diff.max()):.3g}); results are no longer reproducible - "
                "restart the server and find what changed the model or the numerics")
