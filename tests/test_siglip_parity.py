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
from steadyclip.engine.prompts import get_template_set
from steadyclip.numerics import drift
from steadyclip.numerics.head import ZeroShotHead

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


def _unit(x: np.ndarray) -> np.ndarray:
    out: np.ndarray = (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)
    return out


def test_drift_scores_a_sigmoid_head_with_its_bias() -> None:
    """Fast-profile drift of a SigLIP model is measured on its sigmoids, not on a softmax over labels."""
    classes = _unit(np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))  # (C=2, D=3)
    ref = _unit(np.array([[0.9, 0.3, 0.1]]))  # (N=1, D)
    moved = _unit(np.array([[0.9, 0.4, 0.1]]))
    sig = ZeroShotHead(scale=10.0, bias=-5.0)

    def sigmoid(img: np.ndarray) -> np.ndarray:
        out: np.ndarray = 1.0 / (1.0 + np.exp(-(10.0 * img.astype(np.float64) @ classes.T.astype(np.float64) - 5.0)))
        return out

    figures = drift.compare(ref, classes, moved, classes, head=sig)
    assert figures.max_abs_prob == pytest.approx(float(np.abs(sigmoid(ref) - sigmoid(moved)).max()), rel=1e-9)
    softmax = drift.compare(ref, classes, moved, classes, head=ZeroShotHead(scale=10.0))
    assert abs(softmax.max_abs_prob - figures.max_abs_prob) > 0.01  # the two heads disagree here


def test_drift_on_a_siglip_model_equals_the_engines_probability_change(checkpoint: Path) -> None:
    loaded = steadyclip.load(ARCH, pretrained=checkpoint)
    engine = steadyclip.Engine(loaded, replicas=1, text_cache=None)
    pixels = torch.stack([loaded.preprocess(im) for im in shape_images(3, seed=5)])
    images, classes = engine.embed_pixels(pixels), engine.embed_texts([TEMPLATE.format(lab) for lab in LABELS])
    other = _unit(images + 0.05 * np.random.default_rng(0).standard_normal(images.shape))  # a "reduced" run

    def probs(emb: np.ndarray) -> np.ndarray:
        return np.array([r.probs for r in engine.classify_embeddings(emb, classes, LABELS,
                                                                     get_template_set([TEMPLATE]))])

    head = ZeroShotHead.from_model(loaded.model)
    assert head.bias is not None
    figures = drift.compare(images, classes, other, classes, head=head)
    engine_change = float(np.abs(probs(images) - probs(other)).max())
    assert figures.max_abs_prob == pytest.approx(engine_change, rel=1e-9) and engine_change > 0.0
    as_softmax = drift.compare(images, classes, other, classes, head=ZeroShotHead(scale=head.scale))
    assert as_softmax.max_abs_prob != pytest.approx(engine_change, rel=1e-3)  # what drift measured before
