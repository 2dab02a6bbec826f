"""steadyclip's preprocessing equals open_clip's own eval transform, bitwise, per pretrained tag.

Each case puts a real open_clip tag's preprocessing entry (mean/std, resize
mode, interpolation, QuickGELU) on a local weights file, then builds the
transform both ways: open_clip.create_model_and_transforms and steadyclip.load.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import pytest
import torch
from open_clip import pretrained as ocp
from PIL import Image

from steadyclip.model.loading import load
from steadyclip.model.registry import DEMO_ARCH, register_demo_config

# (real arch, real tag) whose preprocessing differs in at least one way from the others.
TAG_SOURCES = [
    ("ViT-L-14", "laion2b_s32b_b82k"),  # mean/std 0.5
    ("ViT-H-14", "dfn5b"),  # squash resize, QuickGELU
    ("ViT-L-14-CLIPA", "datacomp1b"),  # ImageNet mean/std, bilinear, squash
    ("MobileCLIP-S1", "datacompdr"),  # mean 0 std 1, bilinear
]


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(7)
    shapes = [(50, 80), (97, 61), (64, 64), (300, 200)]
    imgs = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in shapes]
    imgs.append(Image.fromarray(rng.integers(0, 256, (40, 30), dtype=np.uint8), "L"))
    return imgs


def _both(arch: str, tag: str, cfg: dict[str, Any], weights: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[
        Callable[[Image.Image], torch.Tensor], Callable[[Image.Image], torch.Tensor]]:
    entry = {**cfg, "file": str(weights)}
    entry.pop("hf_hub", None)
    entry.pop("url", None)
    monkeypatch.setitem(ocp._PRETRAINED, arch, {**ocp._PRETRAINED.get(arch, {}), tag: entry})
    _, _, theirs = open_clip.create_model_and_transforms(arch, pretrained=tag)
    ours = load(arch, pretrained=tag).preprocess
    return theirs, ours


@pytest.mark.parametrize(("real_arch", "real_tag"), TAG_SOURCES)
def test_tag_preprocessing_matches_open_clip(real_arch: str, real_tag: str, demo_arch_checkpoint: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    register_demo_config()
    cfg = ocp.get_pretrained_cfg(real_arch, real_tag)
    theirs, ours = _both(DEMO_ARCH, "parity_" + real_tag.lower().replace("-", "_"), cfg, demo_arch_checkpoint, monkeypatch)
    for img in _images():
        assert torch.equal(theirs(img), ours(img)), f"preprocessing differs for {real_arch}/{real_tag}"


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["ViT-B-32", "RN50"])
def test_openai_tag_preprocessing_matches(arch: str, arch_checkpoint: Callable[[str], Path],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # The openai tags need QuickGELU: the built model must then accept the same weights too.
    cfg = ocp.get_pretrained_cfg(arch, "openai")
    theirs, ours = _both(arch, "openai", cfg, arch_checkpoint(arch), monkeypatch)
    for img in _images():
        assert torch.equal(theirs(img), ours(img))
