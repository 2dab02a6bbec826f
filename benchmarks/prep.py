"""Benchmark inputs, made once per run in a child process: images, weights, pixels, FLOP counts.

No model hub is reachable here, so every architecture gets random-init weights
(``torch.manual_seed(0)``) saved as ``.safetensors`` - fine for timing, and loaded
through each library's real file-loading path. The bundled demo model is used
as shipped when its weights file is present and verifies; otherwise a random
init of its architecture stands in, with layer-scale gammas raised to trained-like
values so its stochastic depth is visible (recorded as ``demo_weights``).
"""
from __future__ import annotations

import importlib
import importlib.util
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.images import describe, make_images

DEMO_ARCH = "steadyclip-shapes"
STANDIN_GAMMA = 0.5  # trained demo gammas are O(0.1-1); the 1e-6 init would hide DropPath
# Hugging Face CLIP with ViT-B/32 dimensions (what openai/clip-vit-base-patch32 uses).
HF_VIT_B_32: dict[str, Any] = {
    "text_config": {"hidden_size": 512, "intermediate_size": 2048, "num_attention_heads": 8,
                    "num_hidden_layers": 12, "max_position_embeddings": 77},
    "vision_config": {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
                      "num_hidden_layers": 12, "image_size": 224, "patch_size": 32},
    "projection_dim": 512,
}


def demo_paths() -> tuple[Path, Path]:
    """(config JSON, bundled weights) of the demo model, found without importing steadyclip."""
    spec = importlib.util.find_spec("steadyclip")
    assert spec is not None and spec.submodule_search_locations
    demo = Path(next(iter(spec.submodule_search_locations))) / "demo"
    return demo / "steadyclip-shapes.json", demo / "steadyclip-shapes.safetensors"


def register_demo_with_open_clip() -> None:
    """What a user of plain open_clip does for a custom config (no steadyclip import)."""
    import open_clip

    if DEMO_ARCH not in open_clip.list_models():
        open_clip.add_model_config(demo_paths()[0])


def _save(model: torch.nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    # Clone: tied weights must not share storage (safetensors stores each tensor once).
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    tmp = path.with_suffix(".partial")
    save_file(state, str(tmp))
    tmp.rename(path)


def _bundled_demo() -> tuple[Path | None, str]:
    """The bundled demo weights if steadyclip loads them, else (None, why not)."""
    _, weights = demo_paths()
    if not weights.is_file():
        return None, f"bundled weights missing ({weights.name} not built yet)"
    try:
        import steadyclip

        steadyclip.load()
    except Exception as e:  # noqa: BLE001 - any failure means: do not benchmark the bundled file
        return None, f"bundled weights present but do not load: {type(e).__name__}: {str(e)[:160]}"
    return weights, "bundled"


def _flops(model: Any, image_size: tuple[int, int], tokens: torch.Tensor | None) -> dict[str, float]:
    """GFLOP per image / per text, counted once with FlopCounterMode.

    Counted with autograd on: under no_grad/inference_mode ``nn.MultiheadAttention``
    takes a fused fast path that FlopCounterMode does not see (ViT-B-32: 5.9 instead of 8.7).
    """
    from torch.utils.flop_counter import FlopCounterMode

    out: dict[str, float] = {}
    x = torch.randn(1, 3, *image_size)
    with FlopCounterMode(display=False) as fc:
        model.encode_image(x)
    out["image_gflop"] = fc.get_total_flops() / 1e9
    if tokens is not None:
        with FlopCounterMode(display=False) as fc:
            model.encode_text(tokens)
        out["text_gflop"] = fc.get_total_flops() / 1e9
    return out


def _prep_arch(arch: str, n_images: int, images: list[Path], work: Path) -> dict[str, Any]:
    import open_clip
    from open_clip.transform import PreprocessCfg, image_transform_v2
    from PIL import Image

    info: dict[str, Any] = {"arch": arch}
    t = time.perf_counter()
    torch.manual_seed(0)
    model = open_clip.create_model(arch)
    weights = work / f"{arch}.safetensors"
    if arch == DEMO_ARCH:
        bundled, why = _bundled_demo()
        info["demo_weights"] = why
        if bundled is not None:
            weights = bundled
        else:
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if name.endswith("gamma"):
                        p.fill_(STANDIN_GAMMA)
            info["demo_weights"] += f"; stand-in: random init, layer-scale gammas = {STANDIN_GAMMA}"
    if not weights.exists():
        _save(model, weights)
    info["weights"] = str(weights)
    info["weights_mb"] = round(weights.stat().st_size / 1e6, 1)
    info["params_m"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 2)
    cfg = dict(model.visual.preprocess_cfg)
    size = cfg["size"] if isinstance(cfg["size"], (list, tuple)) else (cfg["size"], cfg["size"])
    info["image_size"] = [int(size[0]), int(size[1])]
    tokens = open_clip.get_tokenizer(arch)(["a photo of a cat."])
    model.eval()
    info.update(_flops(model, (int(size[0]), int(size[1])), tokens))
    transform = image_transform_v2(PreprocessCfg(**cfg), is_train=False)
    pixels = torch.stack([transform(Image.open(p).convert("RGB")) for p in images[:n_images]])  # (N, 3, H, W)
    info["pixels"] = str(work / f"pixels_{arch}.npy")
    np.save(info["pixels"], pixels.numpy())
    info["prep_s"] = round(time.perf_counter() - t, 2)
    return info


def _prep_hf(work: Path) -> dict[str, Any]:
    from torch.utils.flop_counter import FlopCounterMode

    hf: Any = importlib.import_module("transformers")  # partly typed: Any, with or without its stubs
    hf.utils.logging.disable_progress_bar()

    torch.manual_seed(0)
    model = hf.CLIPModel(hf.CLIPConfig(**HF_VIT_B_32))
    folder = work / "hf-clip-vit-b-32"
    model.save_pretrained(folder)
    hf.CLIPImageProcessor().save_pretrained(folder)  # CLIP's defaults: 224 shortest edge, centre crop
    model.eval()
    with FlopCounterMode(display=False) as fc:
        model.get_image_features(pixel_values=torch.randn(1, 3, 224, 224))
    return {"dir": str(folder), "image_gflop": fc.get_total_flops() / 1e9,
            "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2)}


def _shape_image(path: Path) -> Path:
    """A red circle on white: in the demo model's training distribution (coloured shapes)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (256, 256), (255, 255, 255))
    ImageDraw.Draw(img).ellipse((48, 48, 208, 208), fill=(220, 30, 30))
    img.save(path, format="PNG")
    return path


def run_prep(spec: dict[str, Any]) -> dict[str, Any]:
    """Spec: work_dir, n_images, seed, archs {arch: n_images}, hf (bool)."""
    logging.getLogger("open_clip").setLevel(logging.ERROR)
    logging.getLogger().setLevel(logging.ERROR)  # open_clip's "initialized randomly" is expected here
    work = Path(spec["work_dir"])
    t = time.perf_counter()
    images = make_images(work / "images", int(spec["n_images"]), seed=int(spec.get("seed", 0)))
    out: dict[str, Any] = {"images": describe(images), "image_paths": [str(p) for p in images],
                           "images_s": round(time.perf_counter() - t, 2), "archs": {}}
    out["shape_image"] = str(_shape_image(work / "red_circle.png"))
    register_demo_with_open_clip()
    for arch, n in spec["archs"].items():
        out["archs"][arch] = _prep_arch(arch, int(n), images, work)
    if spec.get("hf"):
        out["hf"] = _prep_hf(work)
    return out
