"""The behaviour probe's inputs, built in one place: synthetic images and a few texts.

Drawn with numpy (no files), slightly larger than the model input so that the model's own
preprocessing (resize, crop) runs too. The lockfile probe (:mod:`steadyclip.engine.probe`) and
the fast profile's drift measurement (:mod:`steadyclip.engine._fast`) both use them.
"""
from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["PROBE_TEXTS", "probe_images"]

PROBE_TEXTS = ("a photo of a red circle.", "a photo of a dog.", "a diagram", "an empty white page", "x")

def probe_images(size: tuple[int, int] | int, n: int = 6) -> list[Any]:
    """``n`` deterministic RGB images slightly larger than the model input (so resizing runs)."""
    from PIL import Image

    h, w = (size, size) if isinstance(size, int) else size
    hh, ww = h * 3 // 2, w * 3 // 2
    rng = np.random.default_rng(20261130)
    yy, xx = np.mgrid[0:hh, 0:ww].astype(np.float64)
    images = []
    for i in range(n):
        base = np.stack([(xx / ww) * 255, (yy / hh) * 255, ((xx + yy) % 64) * 4], axis=-1)
        noise = rng.integers(0, 64, (hh, ww, 3))
        arr = (base * (i + 1) / n + noise) % 256
        images.append(Image.fromarray(arr.astype(np.uint8), "RGB"))
    return images
