"""Small real open_clip models for the doctor tests: the demo ConvNeXt and a tiny BatchNorm ResNet, random init."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import open_clip
import torch

from steadyclip.model.registry import DEMO_ARCH, register_demo_config

LABELS = ["red circle", "blue square", "green star", "pink ring"]
TINY_RN = "doctor-tiny-rn"  # ModifiedResNet (BatchNorm everywhere), registered by register_configs
_TINY_RN_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8, "patch_size": None},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def add_config(name: str, cfg: dict[str, Any], folder: Path) -> None:
    """Register an open_clip model config under ``name`` (once per process)."""
    if name not in open_clip.list_models():
        path = folder / f"{name}.json"
        path.write_text(json.dumps(cfg))
        open_clip.add_model_config(path)


def register_configs(folder: Path) -> list[Any]:
    """Register the demo and tiny-ResNet configs; returns three shape images to diagnose on."""
    register_demo_config()
    add_config(TINY_RN, _TINY_RN_CFG, folder)
    return shape_images()


def shape_images(n: int = 3, seed: int = 7) -> list[Any]:
    from steadyclip.demo.shapes import generate

    return [im for im, _, _ in generate(n, seed=seed)]


def build(arch: str, seed: int = 0) -> Any:  # open_clip models are untyped
    torch.manual_seed(seed)
    return open_clip.create_model(arch)


def drop_path_convnext() -> Any:  # open_clip models are untyped
    """The demo ConvNeXt with trained-like layer-scale gammas and only DropPath stochastic (head dropout off)."""
    model = build(DEMO_ARCH)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.fill_(1.0)  # fresh ConvNeXt has 1e-6, which hides DropPath
    model.visual.head.drop.p = 0.0
    return model
