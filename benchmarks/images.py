"""Deterministic, photo-sized benchmark images: gradients, shapes, blur and sensor-like noise.

Real JPEG/PNG files at typical camera and web sizes, so end-to-end figures include
the decode and resize cost a user pays. The same ``(n, seed)`` gives the same
pixels; the files' SHA-256 digests go into the results so runs can be compared.

    >>> paths = make_images(Path("/tmp/imgs"), 48)
"""
from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

# (width, height): VGA to 2 MP, landscape and portrait.
SIZES: tuple[tuple[int, int], ...] = (
    (640, 480), (800, 600), (1024, 768), (1280, 960), (1600, 1200), (480, 640), (1200, 1600), (1024, 1024),
)
PNG_EVERY = 4  # every 4th file is a PNG, the rest JPEG (quality 90)


def render(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """One natural-ish RGB image: sky-like gradient, 6-14 blurred shapes, Gaussian noise."""
    top, bottom = rng.integers(0, 256, size=(2, 3))
    t = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]  # (H, 1, 1)
    tilt = np.linspace(-20.0, 20.0, width, dtype=np.float32)[None, :, None] * rng.uniform(-1, 1)  # (1, W, 1)
    base = (1 - t) * top[None, None, :] + t * bottom[None, None, :] + tilt  # (H, W, 3)
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(6, 15))):
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        w, h = int(rng.integers(width // 20, width // 2)), int(rng.integers(height // 20, height // 2))
        kind = int(rng.integers(0, 3))
        if kind == 0:
            draw.ellipse((x0, y0, x0 + w, y0 + h), fill=colour)
        elif kind == 1:
            draw.rectangle((x0, y0, x0 + w, y0 + h), fill=colour)
        else:
            pts = [(int(x0 + rng.integers(-w, w)), int(y0 + rng.integers(-h, h))) for _ in range(int(rng.integers(3, 7)))]
            draw.polygon(pts, fill=colour)
    img = img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.5, 2.5))))
    noise = rng.normal(0.0, 6.0, size=(height, width, 3)).astype(np.float32)  # sensor-like grain
    arr = np.clip(np.asarray(img, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


def make_images(folder: Path, n: int, *, seed: int = 0) -> list[Path]:
    """Write ``n`` images into ``folder`` (created) and return their paths, in order."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        width, height = SIZES[i % len(SIZES)]
        img = render(rng, width, height)
        if i % PNG_EVERY == PNG_EVERY - 1:
            path = folder / f"img_{i:04d}_{width}x{height}.png"
            img.save(path, format="PNG", compress_level=6)
        else:
            path = folder / f"img_{i:04d}_{width}x{height}.jpg"
            img.save(path, format="JPEG", quality=90)
        paths.append(path)
    return paths


def describe(paths: Sequence[Path]) -> dict[str, object]:
    """Count, formats, sizes and a digest over all files' bytes (for the results JSON)."""
    h = hashlib.sha256()
    total = 0
    for p in paths:
        data = p.read_bytes()
        total += len(data)
        h.update(hashlib.sha256(data).digest())
    sizes = sorted({p.stem.rsplit("_", 1)[-1] for p in paths})
    return {
        "count": len(paths),
        "jpeg": sum(p.suffix == ".jpg" for p in paths),
        "png": sum(p.suffix == ".png" for p in paths),
        "sizes": sizes,
        "total_mb": round(total / 1e6, 2),
        "sha256": h.hexdigest(),
    }
