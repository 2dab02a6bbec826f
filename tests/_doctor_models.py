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


# ---- doctor --script: weights files and a Hugging Face cache laid out as huggingface_hub does ----------------

TINY_VIT = "doctor-tiny-vit"  # a ViT with no dropout of any kind: train mode changes only the kernels used
TINY_VIT_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def save_weights(model: Any, path: Path) -> Path:
    from safetensors.torch import save_file

    save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def write_config(name: str, cfg: dict[str, Any], folder: Path) -> Path:
    """An open_clip model config file a script can pass to ``open_clip.add_model_config``."""
    path = folder / f"{name}.json"
    path.write_text(json.dumps(cfg))
    return path


def garble(src: Path, dst: Path, tensor: str) -> Path:
    """A copy whose bytes of one tensor are 0xFF (NaN in float32): it still parses, it is still wrong."""
    import struct

    data = bytearray(src.read_bytes())
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    start, end = header[tensor]["data_offsets"]
    data[8 + n + start:8 + n + end] = b"\xff" * (end - start)
    dst.write_bytes(bytes(data))
    return dst


def hub_cache(hf_home: Path, repo: str, files: dict[str, Path | bytes], *, cut: dict[str, int] | None = None,
              ) -> Path:
    """Put ``files`` into ``hf_home``'s hub cache as huggingface_hub lays a download out: blobs named by their
    SHA-256, a snapshot of symlinks, refs/main. ``cut`` truncates a file after writing (a broken download)."""
    import hashlib
    import os

    root = hf_home / "hub" / ("models--" + repo.replace("/", "--"))
    commit = hashlib.sha1(repo.encode()).hexdigest()
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(commit)
    (root / "blobs").mkdir(exist_ok=True)
    snap = root / "snapshots" / commit
    snap.mkdir(parents=True, exist_ok=True)
    for name, src in files.items():
        if isinstance(src, Path):
            sha = hashlib.sha256(src.read_bytes()).hexdigest()
            blob = root / "blobs" / sha
            if not blob.exists():
                os.link(src, blob) if not (cut and name in cut) else blob.write_bytes(src.read_bytes())
        else:
            sha = hashlib.sha256(src).hexdigest()
            blob = root / "blobs" / sha
            blob.write_bytes(src)
        if cut and name in cut:
            with open(blob, "r+b") as fh:
                fh.truncate(cut[name])
        (snap / name).symlink_to(os.path.relpath(blob, snap))
    return snap
