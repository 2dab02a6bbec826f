"""SigLIP: ``Engine.classify`` and ``doctor`` report the same per-label sigmoid probabilities.

A small open_clip SigLIP architecture (``ViT-B-16-SigLIP``'s config - CustomTextCLIP, timm
ViT with MAP pooling, non-causal text tower, ``logit_bias`` - with a tiny timm ViT and text
tower), random init, saved to a temp safetensors file and loaded by ``steadyclip.load``.
Tokenizer stand-in: the real one is a Hugging Face T5 tokenizer (``transformers`` plus a
download); this config names none, so open_clip gives its bundled BPE tokenizer. open_clip
also picks the T5 tokenizer for any bare name containing "siglip", hence the name below.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import pytest
import torch
from _doctor_models import add_config, shape_images

import steadyclip
from steadyclip.doctor import diagnose

ARCH = "parity-tiny-sigmoid-vit"
LABELS = ["red circle", "blue square", "green star"]
TEMPLATE = "a photo of a {}."


def _tiny_siglip_config() -> dict[str, Any]:
    cfg: dict[str, Any] = copy.deepcopy(open_clip.get_model_config("ViT-B-16-SigLIP"))
    cfg["embed_dim"] = 64
    cfg["vision_cfg"].update(timm_model_name="test_vit", image_size=64)
    text = cfg["text_cfg"]
    del text["hf_tokenizer_name"], text["tokenizer_kwargs"]
    text.update(vocab_size=49408, width=64, heads=2, layers=1, context_length=16)
    return cfg


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("siglip")
    add_config(ARCH, _tiny_siglip_config(), folder)
    torch.manual_seed(0)
    model = open_clip.create_model(ARCH)
    assert model.logit_bias is not None  # a SigLIP model by open_clip's convention
    path = folder / "tiny-siglip.safetensors"
    save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def _siglip_formula(loaded: steadyclip.LoadedModel, images: list[Any]) -> np.ndarray:
    """``sigmoid(logit_scale.exp() * img @ txt.T + logit_bias)`` on the raw embeddings (SigLIP's own head)."""
    m: Any = loaded.model
    pixels = torch.stack([loaded.preprocess(im) for im in images])
    with torch.no_grad():
        img = torch.nn.functional.normalize(m.encode_image(pixels).double(), dim=-1)
        txt = torch.nn.functional.normalize(m.encode_text(loaded.tokenizer(
            [TEMPLATE.format(lab) for lab in LABELS])).double(), dim=-1)
        logits = m.logit_scale.exp().double() * img @ txt.T + m.logit_bias.double()
    return torch.sigmoid(logits).numpy()


def test_classify_and_doctor_give_siglips_own_probabilities(checkpoint: Path) -> None:
    images = shape_images(2, seed=11)
    loaded = steadyclip.load(ARCH, pretrained=checkpoint)
    expected = _siglip_formula(loaded, images)

    engine = steadyclip.Engine(loaded, replicas=1, text_cache=None)
    classified = np.array([r.probs for r in engine.classify(images, LABELS, templates=[TEMPLATE])])
    d = diagnose(loaded.model, loaded.preprocess, loaded.tokenizer, images=images, labels=LABELS, runs=1,
                 templates=[TEMPLATE])
    doctored = np.array(d.runs[0].fixed)

    assert classified.shape == doctored.shape == expected.shape == (2, len(LABELS))
    # float32 forwards at other batch shapes: equal to ~1e-6 relative; softmax would be off by orders
    np.testing.assert_allclose(classified, expected, rtol=1e-4, atol=0)
    np.testing.assert_allclose(doctored, expected, rtol=1e-4, atol=0)
    np.testing.assert_allclose(doctored, classified, rtol=1e-4, atol=0)
    assert not np.allclose(classified.sum(axis=1), 1.0)  # independent sigmoids, not a softmax over labels
    assert d.verdict == "stable", [c.to_dict() for c in d.problems]
