"""Write the repository's example images and label list, reproducibly.

    python -m steadyclip.demo.make_examples --out examples

Each example is rendered at 128x128 without pixel noise (so the PNGs stay a
few KB); the model's preprocessing resizes them to 64x64.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import numpy as np

from steadyclip.demo.shapes import render
from steadyclip.model.registry import demo_labels

_logger = logging.getLogger("steadyclip.demo.make_examples")

# (colour, shape) pairs that between them show every shape and six colours.
EXAMPLES: tuple[tuple[str, str], ...] = (
    ("red", "circle"),
    ("blue", "square"),
    ("green", "triangle"),
    ("yellow", "star"),
    ("purple", "cross"),
    ("orange", "ring"),
)
EXAMPLE_SEED = 2024
EXAMPLE_SIZE = 128


def make_examples(out_dir: str | os.PathLike[str], *, seed: int = EXAMPLE_SEED, size: int = EXAMPLE_SIZE) -> list[Path]:
    """Render ``EXAMPLES`` as ``<colour>_<shape>.png`` and write ``labels.txt``; returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for index, (colour, shape) in enumerate(EXAMPLES):
        rng = np.random.default_rng([seed, index])
        path = out / f"{colour}_{shape}.png"
        render(colour, shape, rng, size, noise=False).save(path, optimize=True)
        written.append(path)
        _logger.info("wrote %s (%d bytes)", path, path.stat().st_size)
    labels = out / "labels.txt"
    labels.write_text("".join(f"{label}\n" for label in demo_labels()), encoding="utf-8")
    written.append(labels)
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("examples"))
    p.add_argument("--seed", type=int, default=EXAMPLE_SEED)
    p.add_argument("--size", type=int, default=EXAMPLE_SIZE)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    for path in make_examples(args.out, seed=args.seed, size=args.size):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
