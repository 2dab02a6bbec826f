"""Pixel-mode conversions to 8-bit RGB (16-bit, float, alpha), for :mod:`steadyclip.engine.images`."""
from __future__ import annotations

import numpy as np
from PIL import Image

from steadyclip.errors import ImageDecodeError

_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}


def to_rgb(im: Image.Image, bg: tuple[int, int, int], name: str) -> Image.Image:
    mode = im.mode
    if mode.startswith("I;16") or mode == "I":
        return _sixteen_bit_to_rgb(im, name)
    if mode == "F":
        return _float_to_rgb(im, name)
    if mode in _ALPHA_MODES or (mode in ("P", "L", "RGB", "1") and im.has_transparency_data):
        rgba = im.convert("RGBA") if mode != "La" else im.convert("LA").convert("RGBA")
        base = Image.new("RGBA", im.size, (*bg, 255))
        return Image.alpha_composite(base, rgba).convert("RGB")
    if mode == "RGB":
        return im
    return im.convert("RGB")


def _sixteen_bit_to_rgb(im: Image.Image, name: str) -> Image.Image:
    values = np.asarray(im).astype(np.int64)  # (H, W)
    if values.size and (values.min() < 0 or values.max() > 65535):
        raise ImageDecodeError(
            f"{name} is a 32-bit integer image with values in [{values.min()}, {values.max()}], outside 0..65535; "
            "its display range is ambiguous: scale it to 8 or 16 bits yourself and pass the PIL image"
        )
    grey = ((values + 128) // 257).astype(np.uint8)  # == round(v * 255 / 65535), exactly
    return Image.fromarray(grey).convert("RGB")


def _float_to_rgb(im: Image.Image, name: str) -> Image.Image:
    values = np.asarray(im, dtype=np.float64)  # (H, W)
    if values.size and not np.isfinite(values).all():
        raise ImageDecodeError(f"{name} is a float image containing NaN or infinity; clean it before use")
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if low < 0.0 or high > 255.0:
        raise ImageDecodeError(
            f"{name} is a float image with values in [{low:g}, {high:g}]; only [0, 1] or [0, 255] have a "
            "defined meaning: scale it yourself and pass the PIL image"
        )
    scale = 255.0 if high <= 1.0 else 1.0
    grey = np.rint(values * scale).astype(np.uint8)
    return Image.fromarray(grey).convert("RGB")


__all__ = ["to_rgb"]
