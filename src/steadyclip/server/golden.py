"""The golden self-check behind ``/readyz``: a fixed probe image whose embedding must not change.

At start-up the server embeds a synthetic image (built from arithmetic alone,
no RNG, no file) through exactly the path requests take, and keeps the
float32 result. Each readiness probe recomputes it and compares *bitwise*:
any drift - weights changed in memory, a thread-count or flag change, a
batching bug - turns the server unready instead of quietly changing answers.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from steadyclip._util.digest import sha256_array
from steadyclip.engine.probe_inputs import golden_probe_image

_logger = logging.getLogger(__name__)

PROBE_DESCRIPTION = "synthetic 96x80 RGB pattern (gradients + xor texture), built in code"
probe_image = golden_probe_image  # the one home of probe images is steadyclip.engine.probe_inputs


def digest(arr: np.ndarray) -> str:
    """SHA-256 of the reference's bytes (:func:`steadyclip._util.digest.sha256_array`; always float32 (D,))."""
    return sha256_array(arr)


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
