"""Seeded procedural images of coloured shapes: the demo model's whole world.

Every image is one saturated shape (8 colours x 6 kinds) on a low-saturation,
lightly textured background, so colour never leaks from the background into the
label. All randomness comes from one ``numpy.random.Generator``; drawing is
done with PIL at 4x and downsampled, so a seed gives the same pixels in every
run on the same numpy/Pillow versions.

Example:
    >>> from steadyclip.demo.shapes import generate
    >>> img, colour, shape = generate(1, seed=0)[0]
    >>> img.size, img.mode
    ((64, 64), 'RGB')
"""
from __future__ import annotations

import logging
import math

import numpy as np
from PIL import Image, ImageDraw

from steadyclip.errors import InputError
from steadyclip.model.registry import DEMO_COLOURS, DEMO_SHAPES

_logger = logging.getLogger(__name__)

__all__ = ["COLOUR_RGB", "Sample", "generate", "render", "render_mask"]

Sample = tuple[Image.Image, str, str]

# Base RGB for each colour name, spread around the hue circle so that, even with
# jitter, neighbours (red/orange, blue/purple, pink/red) stay apart.
COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (214, 28, 32),
    "orange": (248, 132, 16),
    "yellow": (246, 222, 28),
    "green": (36, 168, 52),
    "cyan": (24, 206, 222),
    "blue": (30, 60, 222),
    "purple": (136, 40, 196),
    "pink": (250, 128, 196),
}
assert tuple(COLOUR_RGB) == DEMO_COLOURS

_SUPERSAMPLE = 4
_COLOUR_JITTER = 14  # +/- per channel, before brightness scaling
_MAX_ROTATION_DEG = 18.0
_BG_MAX_SATURATION = 0.12  # max(rgb)-min(rgb) relative to 255, before noise


def _polygon_points(shape: str, radius: float, angle: float) -> list[tuple[float, float]]:
    """Vertices of a unit-centred polygon shape, rotated by ``angle`` radians."""
    if shape == "square":
        r = radius * 0.82  # a square fills its bounding circle more than a circle does
        base = [(-r, -r), (r, -r), (r, r), (-r, r)]
    elif shape == "triangle":
        base = [
            (radius * math.cos(a), radius * math.sin(a))
            for a in (-math.pi / 2, -math.pi / 2 + 2 * math.pi / 3, -math.pi / 2 + 4 * math.pi / 3)
        ]
        base = [(x, y + radius * 0.15) for x, y in base]  # centre the visual mass
    elif shape == "star":
        base = []
        for k in range(10):
            r = radius if k % 2 == 0 else radius * 0.42
            a = -math.pi / 2 + k * math.pi / 5
            base.append((r * math.cos(a), r * math.sin(a)))
    elif shape == "cross":
        a, b = radius, radius * 0.34
        base = [
            (-b, -a), (b, -a), (b, -b), (a, -b), (a, b), (b, b),
            (b, a), (-b, a), (-b, b), (-a, b), (-a, -b), (-b, -b),
        ]
    else:
        raise ValueError(f"not a polygon shape: {shape!r}")
    c, s = math.cos(angle), math.sin(angle)
    return [(x * c - y * s, x * s + y * c) for x, y in base]


def render_mask(shape: str, cx: float, cy: float, radius: float, angle: float, size: int) -> np.ndarray:
    """Anti-aliased coverage mask of one shape, float32 in [0, 1], shape (size, size)."""
    if shape not in DEMO_SHAPES:
        raise InputError(f"unknown shape {shape!r}; use one of {DEMO_SHAPES}")
    k = _SUPERSAMPLE
    big = Image.new("L", (size * k, size * k), 0)
    draw = ImageDraw.Draw(big)
    X, Y, R = cx * k, cy * k, radius * k
    if shape == "circle":
        draw.ellipse((X - R, Y - R, X + R, Y + R), fill=255)
    elif shape == "ring":
        inner = R * 0.58
        draw.ellipse((X - R, Y - R, X + R, Y + R), fill=255)
        draw.ellipse((X - inner, Y - inner, X + inner, Y + inner), fill=0)
    else:
        pts = [(X + x, Y + y) for x, y in _polygon_points(shape, R, angle)]
        draw.polygon(pts, fill=255)
    small = big.resize((size, size), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A greyish, lightly tinted, textured background, float32 (size, size, 3) in [0, 255]."""
    level = rng.uniform(55.0, 225.0)
    tint = rng.uniform(-1.0, 1.0, size=3)
    tint *= _BG_MAX_SATURATION * 255.0 / 2.0 / max(float(np.abs(tint).max()), 1e-6)
    base = level + tint  # (3,)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    kind = int(rng.integers(0, 4))
    amp = rng.uniform(6.0, 22.0)
    if kind == 0:  # flat
        tex = np.zeros((size, size), np.float32)
    elif kind == 1:  # linear gradient
        theta = rng.uniform(0, 2 * math.pi)
        tex = amp * ((xx - 0.5) * math.cos(theta) + (yy - 0.5) * math.sin(theta)) * 2
    elif kind == 2:  # soft stripes
        theta = rng.uniform(0, math.pi)
        freq = rng.uniform(3.0, 9.0)
        tex = amp * 0.6 * np.sin(2 * math.pi * freq * (xx * math.cos(theta) + yy * math.sin(theta)))
    else:  # blotchy low-frequency noise
        coarse = rng.normal(0.0, 1.0, size=(5, 5)).astype(np.float32)
        up = Image.fromarray(coarse, mode="F").resize((size, size), Image.Resampling.BICUBIC)
        tex = amp * 0.7 * np.asarray(up, dtype=np.float32)
    return base[None, None, :] + tex[:, :, None]


def _shape_colour(colour: str, rng: np.random.Generator) -> np.ndarray:
    """The named colour with per-channel jitter and a brightness scale, float32 (3,)."""
    try:
        base = np.asarray(COLOUR_RGB[colour], dtype=np.float32)
    except KeyError:
        raise InputError(f"unknown colour {colour!r}; use one of {DEMO_COLOURS}") from None
    rgb = base + rng.uniform(-_COLOUR_JITTER, _COLOUR_JITTER, size=3)
    rgb *= rng.uniform(0.86, 1.04)
    return np.clip(rgb, 0.0, 255.0).astype(np.float32)


def render(colour: str, shape: str, rng: np.random.Generator, size: int = 64, *, noise: bool = True) -> Image.Image:
    """Draw one ``colour`` ``shape`` at a random size, place and tilt.

    Args:
        colour: one of ``DEMO_COLOURS``.
        shape: one of ``DEMO_SHAPES``.
        rng: the only source of randomness; advancing it is the caller's seed.
        size: output side in pixels (square image).
        noise: add per-pixel Gaussian noise (sigma drawn from 0..6); ``False``
            is the noiseless end of that range and compresses far better.

    Returns:
        An RGB ``PIL.Image`` of ``size`` x ``size``.
    """
    fg = _shape_colour(colour, rng)
    bg = _background(rng, size)
    radius = rng.uniform(0.2, 0.42) * size
    margin = radius + 1.0
    cx = rng.uniform(margin, size - margin)
    cy = rng.uniform(margin, size - margin)
    angle = math.radians(rng.uniform(-_MAX_ROTATION_DEG, _MAX_ROTATION_DEG))
    mask = render_mask(shape, cx, cy, radius, angle, size)[:, :, None]  # (H, W, 1)
    # A faint light-to-dark shading keeps the shape from being one flat value.
    yy = np.linspace(-1.0, 1.0, size, dtype=np.float32)[:, None, None]
    shade = 1.0 + rng.uniform(-0.06, 0.06) * yy
    img = bg * (1.0 - mask) + fg[None, None, :] * shade * mask
    sigma = rng.uniform(0.0, 6.0)
    if noise:
        img = img + rng.normal(0.0, sigma, size=img.shape)
    arr = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return Image.fromarray(arr, mode="RGB")


def generate(n: int, seed: int, size: int = 64) -> list[Sample]:
    """``n`` random (image, colour, shape) samples, the same for the same seed.

    Labels are drawn uniformly from the 48 colour x shape pairs.

    Example:
        >>> [(c, s) for _, c, s in generate(2, seed=1)]  # doctest: +SKIP
        [('blue', 'star'), ('red', 'ring')]
    """
    if n < 0:
        raise InputError(f"n must be >= 0, got {n}; ask for zero or more samples")
    rng = np.random.default_rng(seed)
    out: list[Sample] = []
    for _ in range(n):
        colour = DEMO_COLOURS[int(rng.integers(len(DEMO_COLOURS)))]
        shape = DEMO_SHAPES[int(rng.integers(len(DEMO_SHAPES)))]
        out.append((render(colour, shape, rng, size), colour, shape))
    _logger.debug("generated %d shape images (seed=%d, size=%d)", n, seed, size)
    return out
