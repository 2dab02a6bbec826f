"""The bundled demo model: its bytes, its accuracy, and the instability it is meant to show."""
from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from steadyclip.demo.shapes import generate, render
from steadyclip.errors import InputError
from steadyclip.model.registry import (
    DEMO_ARCH,
    DEMO_SPEC,
    demo_labels,
    register_demo_config,
)

WEIGHTS = DEMO_SPEC.weights_file
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
UNSEEN_SEED = 31_337  # training draws from [seed, step] seed sequences, never a bare int
PROMPT = "a photo of a {}."


@pytest.fixture(scope="module")
def demo() -> Any:
    """(model, eval preprocess, tokenizer) with the bundled weights, built straight through open_clip."""
    import open_clip
    from safetensors.torch import load_file

    assert WEIGHTS is not None
    register_demo_config()
    model, _, preprocess = open_clip.create_model_and_transforms(DEMO_ARCH)
    model.load_state_dict(load_file(str(WEIGHTS)), strict=True)
    return model, preprocess, open_clip.get_tokenizer(DEMO_ARCH)


@pytest.fixture(autouse=True)
def _one_thread() -> Any:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _logits(demo: Any, images: list[Any]) -> torch.Tensor:
    """(N, 48) zero-shot logits with the learned scale (as the engine uses), in whatever mode the model is in."""
    model, preprocess, tokenizer = demo
    with torch.no_grad():
        text = model.encode_text(tokenizer([PROMPT.format(label) for label in demo_labels()]), normalize=True)
        x = torch.stack([preprocess(im) for im in images])  # (N, 3, 64, 64)
        logits: torch.Tensor = model.logit_scale.exp() * model.encode_image(x, normalize=True) @ text.t()
    return logits


def test_weights_hash_matches_pinned_spec() -> None:
    assert WEIGHTS is not None and WEIGHTS.is_file()
    assert hashlib.sha256(WEIGHTS.read_bytes()).hexdigest() == DEMO_SPEC.sha256


def test_weights_are_small_fp32_safetensors() -> None:
    assert WEIGHTS is not None
    data = WEIGHTS.read_bytes()
    assert len(data) <= 10 * 1024 * 1024
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + header_len])
    meta = json.loads(header.pop("__metadata__")["steadyclip"])
    assert meta["arch"] == DEMO_ARCH and meta["train"]["seed"] == 0
    assert {entry["dtype"] for entry in header.values()} == {"F32"}
    assert "logit_scale" in header and "visual.trunk.stem.0.weight" in header


def test_zero_shot_accuracy_on_unseen_images(demo: Any) -> None:
    model = demo[0]
    model.eval()
    samples = generate(500, UNSEEN_SEED)
    labels = demo_labels()
    truth = torch.tensor([labels.index(f"{c} {s}") for _, c, s in samples])
    pred = torch.cat([_logits(demo, [im for im, _, _ in samples[i : i + 250]]).argmax(1) for i in (0, 250)])
    accuracy = float((pred == truth).float().mean())
    assert accuracy >= 0.90, f"zero-shot top-1 {accuracy:.3f} on 500 unseen images"


def test_bundled_examples_are_classified_as_named(demo: Any) -> None:
    from PIL import Image

    demo[0].eval()
    paths = sorted(EXAMPLES.glob("*.png"))
    assert len(paths) >= 6
    for path in paths:
        assert path.stat().st_size < 16 * 1024
    images = [Image.open(p).convert("RGB") for p in paths]
    predicted = [demo_labels()[i] for i in _logits(demo, images).argmax(1)]
    assert predicted == [p.stem.replace("_", " ") for p in paths]
    assert (EXAMPLES / "labels.txt").read_text(encoding="utf-8").splitlines() == demo_labels()


def _as_bytes(samples: list[Any]) -> list[tuple[bytes, str, str]]:
    return [(im.tobytes(), c, s) for im, c, s in samples]


def test_generator_is_deterministic_per_seed() -> None:
    first = generate(12, seed=7)
    again = generate(12, seed=7)
    other = generate(12, seed=8)
    assert _as_bytes(first) == _as_bytes(again)
    assert _as_bytes(first) != _as_bytes(other)
    assert all(im.size == (64, 64) and im.mode == "RGB" for im, _, _ in first)
    a = render("pink", "star", np.random.default_rng(3), 128)
    b = render("pink", "star", np.random.default_rng(3), 128)
    assert a.tobytes() == b.tobytes() and a.size == (128, 128)


def test_generator_rejects_unknown_names() -> None:
    with pytest.raises(InputError, match="magenta"):
        render("magenta", "circle", np.random.default_rng(0))
    with pytest.raises(InputError, match="hexagon"):
        render("red", "hexagon", np.random.default_rng(0))


def test_train_mode_is_unstable_and_eval_mode_is_not(demo: Any) -> None:
    model = demo[0]
    image = [generate(1, UNSEEN_SEED)[0][0]]
    try:
        model.train()
        torch.manual_seed(0)
        train_probs = torch.stack([_logits(demo, image).softmax(1)[0] for _ in range(10)])  # (10, 48)
        model.eval()
        eval_probs = torch.stack([_logits(demo, image).softmax(1)[0] for _ in range(3)])
    finally:
        model.eval()
    spread = float((train_probs.max(0).values - train_probs.min(0).values).max())
    assert spread > 0.01, f"train-mode probabilities barely move (spread {spread:.4f})"
    assert torch.equal(eval_probs[0], eval_probs[1]) and torch.equal(eval_probs[0], eval_probs[2])
