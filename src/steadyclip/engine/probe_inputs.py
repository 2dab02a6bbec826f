"""The behaviour probe's inputs, built in one place: synthetic images and a few texts.

Drawn with numpy (no files), slightly larger than the model input so that the model's own
preprocessing (resize, crop) runs too. The lockfile probe (:mod:`steadyclip.engine.probe`) and
the fast profile's drift measurement (:mod:`steadyclip.engine._fast`) both use them; the
server's readiness check (:mod:`steadyclip.server.golden`) uses :func:`golden_probe_image`.
"""
from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["GOLDEN_PROBE_SIZE", "PROBE_TEXTS", "golden_probe_image", "probe_images"]

PROBE_TEXTS = ("a photo of a red circle.", "a photo of a dog.", "a diagram", "an empty white page", "x")
GOLDEN_PROBE_SIZE = (96, 80)  # (W, H): not square, so resize and crop both do work


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


def golden_probe_image() -> Any:
    """The server's readiness probe: one RGB image from arithmetic alone (no RNG), the same on every machine."""
    from PIL import Image

    w, h = GOLDEN_PROBE_SIZE
    y, x = np.mgrid[0:h, 0:w]  # (H, W) each
    r = (x * 255) // (w - 1)
    g = (y * 255) // (h - 1)
    b = ((x ^ y) * 37) % 256
    rgb = np.stack([r, g, b], axis=-1).astype(np.uint8)  # (H, W, 3)
    return Image.fromarray(rgb, mode="RGB")
