"""The measuring instrument: inputs in, zero-shot probabilities out, under a chosen configuration.

Every check is "run the model twice, changing one thing, and compare". This
module holds the pieces they share: turning images/labels into tensors,
encoding with both towers at a chosen chunk size, the zero-shot head (in
float64, so the head itself adds no noise), and the comparison metrics.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from steadyclip.errors import InputError, NumericsError
from steadyclip.numerics.head import ZeroShotHead

_logger = logging.getLogger(__name__)

__all__ = [
    "Encoded",
    "Inputs",
    "amp_autocast",
    "class_embeddings",
    "encode",
    "expected_preprocess",
    "fp32_view",
    "head",
    "max_abs_diff",
    "model_device",
    "model_float_dtype",
    "no_autocast",
    "prepare_inputs",
    "probs_of",
    "spread",
    "top1_changes",
    "zero_shot",
]


@dataclass
class Inputs:
    """Everything a forward needs, prepared once.

    ``pils`` is ``None`` when images came in as an already preprocessed tensor.
    ``pixels_user`` comes from the user's preprocess (first call), ``pixels_expected``
    from the model's own eval transform (``None`` without PIL images).
    """

    names: list[str]
    pils: list[Any] | None
    pixels_user: torch.Tensor  # (N, 3, H, W)
    pixels_expected: torch.Tensor | None  # (N, 3, H', W')
    tokens: torch.Tensor  # (C*T, L), label-major
    labels: list[str]
    n_templates: int
    user_preprocess: Callable[[Any], torch.Tensor] | None


@dataclass
class Encoded:
    """L2-normalised float64 embeddings of one configuration."""

    images: np.ndarray  # (N, D)
    texts: np.ndarray  # (C*T, D)


def model_device(model: torch.nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def model_float_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype of the model's floating-point weights (the first one found)."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def fp32_view(model: torch.nn.Module) -> torch.nn.Module:
    """The model itself when its weights are float32, else a float32 copy (the user's stays untouched)."""
    if all(t.dtype == torch.float32 for t in model.parameters() if t.is_floating_point()):
        return model
    return copy.deepcopy(model).float()


def expected_preprocess(model: torch.nn.Module, expected: dict[str, Any] | None = None) -> Callable[[Any], torch.Tensor]:
    """open_clip's eval transform for the model's ``visual.preprocess_cfg`` (or an explicit config)."""
    from open_clip.transform import PreprocessCfg, image_transform_v2

    cfg = dict(expected) if expected is not None else preprocess_cfg_of(model)
    if cfg is None:
        raise InputError(
            "the model has no visual.preprocess_cfg (not built by open_clip?) and no expected preprocessing "
            "was given; pass preprocess=... or expected_preprocess={'size': 224, 'mean': ..., 'std': ...}"
        )
    known = {k: v for k, v in cfg.items() if k in PreprocessCfg.__dataclass_fields__}
    return image_transform_v2(PreprocessCfg(**known), is_train=False)  # type: ignore[no-any-return]


def preprocess_cfg_of(model: torch.nn.Module) -> dict[str, Any] | None:
    visual = getattr(model, "visual", None)
    cfg = getattr(visual, "preprocess_cfg", None)
    return dict(cfg) if isinstance(cfg, dict) and cfg else None


def _image_name(src: object, i: int) -> str:
    if isinstance(src, (str, os.PathLike)):
        return os.path.basename(os.fspath(src)) or os.fspath(src)
    return f"image {i}"


def _to_pil(src: object) -> Any:
    from steadyclip.engine.images import load_image

    return load_image(src)  # type: ignore[arg-type]


def default_tokenizer(model: torch.nn.Module) -> Callable[[list[str]], torch.Tensor]:
    """open_clip's CLIP BPE tokenizer at the model's context length (what standard CLIP towers use)."""
    import open_clip

    text = getattr(model, "text", None)
    if text is not None and type(text).__name__ == "HFTextEncoder":
        raise InputError(
            "this model has a Hugging Face text tower whose tokenizer cannot be guessed from the model object; "
            "pass tokenizer=open_clip.get_tokenizer('<model name>')"
        )
    ctx = int(getattr(model, "context_length", 77) or 77)
    tok: Callable[[list[str]], torch.Tensor] = open_clip.SimpleTokenizer(context_length=ctx)
    return tok


def prepare_inputs(
    model: torch.nn.Module,
    images: Sequence[Any] | torch.Tensor,
    labels: Sequence[str],
    *,
    preprocess: Callable[[Any], torch.Tensor] | None,
    tokenizer: Callable[..., torch.Tensor] | None,
    templates: Any,
    expected: dict[str, Any] | None,
) -> Inputs:
    """Decode images, run the user's (or the model's) preprocess and tokenize label prompts.

    Raises:
        InputError / ImageError / LabelError: no images, unreadable images, bad labels.
    """
    from steadyclip.engine.prompts import get_template_set, validate_labels

    clean = validate_labels(labels)
    if len(clean) < 2:
        raise InputError(f"give at least two labels to compare probabilities over, got {clean!r}")
    tset = get_template_set(templates)
    prompts = [p for lab in clean for p in tset.fill(lab)]
    tok = tokenizer if tokenizer is not None else default_tokenizer(model)
    tokens = tok(prompts)
    if isinstance(images, torch.Tensor):
        if images.ndim != 4 or images.shape[0] == 0:
            raise InputError(f"a pixel tensor must be (N, 3, H, W) with N >= 1, got {tuple(images.shape)}")
        pixels = images.detach().float().cpu()
        return Inputs([f"image {i}" for i in range(pixels.shape[0])], None, pixels, None, tokens, clean,
                      len(tset.templates), None)
    if isinstance(images, (str, bytes, os.PathLike)) or not isinstance(images, Sequence):
        images = [images]
    if not images:
        raise InputError("no images given; pass image paths or PIL images (a few distinct ones are enough)")
    pils = [_to_pil(im) for im in images]
    names = [_image_name(src, i) for i, src in enumerate(images)]
    try:
        exp_tf: Callable[[Any], torch.Tensor] | None = expected_preprocess(model, expected)
    except InputError:
        if preprocess is None:
            raise
        exp_tf = None
    user_tf = preprocess if preprocess is not None else exp_tf
    assert user_tf is not None
    pixels_user = stack_pixels(user_tf, pils)
    pixels_expected = stack_pixels(exp_tf, pils) if exp_tf is not None else None
    return Inputs(names, pils, pixels_user, pixels_expected, tokens, clean, len(tset.templates),
                  preprocess)


def stack_pixels(transform: Callable[[Any], torch.Tensor], pils: list[Any]) -> torch.Tensor:
    try:
        out = [transform(im) for im in pils]
    except Exception as e:  # the user's transform: any failure is theirs to see, with context
        raise InputError(f"the preprocess transform failed on an input image: {type(e).__name__}: {e}") from e
    if not all(isinstance(t, torch.Tensor) for t in out):
        raise InputError("the preprocess transform must return a torch.Tensor (3, H, W) per image")
    shapes = {tuple(t.shape) for t in out}
    if len(shapes) != 1:
        raise InputError(f"the preprocess transform gave images of different shapes {sorted(shapes)}; "
                         "it must resize/crop to one size")
    return torch.stack(out).float()  # (N, 3, H, W)


@contextlib.contextmanager
def no_autocast(device_type: str) -> Iterator[None]:
    with torch.autocast(device_type=device_type, enabled=False):
        yield


def amp_dtype(device_type: str) -> torch.dtype:
    """What mixed precision means on this device: bf16 on CPU, fp16 on CUDA."""
    return torch.float16 if device_type == "cuda" else torch.bfloat16


@contextlib.contextmanager
def amp_autocast(device_type: str, dtype: torch.dtype | None = None) -> Iterator[None]:
    with torch.autocast(device_type=device_type, dtype=dtype or amp_dtype(device_type)):
        yield


def _chunks(x: torch.Tensor, size: int | None) -> list[torch.Tensor]:
    if size is None or size >= x.shape[0]:
        return [x]
    return [x[i : i + size] for i in range(0, x.shape[0], size)]


def _normalise(x: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return x / np.linalg.norm(x, axis=-1, keepdims=True)  # type: ignore[no-any-return]


def encode(
    model: torch.nn.Module,
    pixels: torch.Tensor,
    tokens: torch.Tensor,
    *,
    image_chunk: int | None = None,
    text_chunk: int | None = None,
    order: Sequence[int] | None = None,
) -> Encoded:
    """Both towers on the model's device, in whatever mode/autocast/flags are in effect; no grad.

    ``order`` permutes the images before encoding (rows are put back in input order).
    """
    dev = model_device(model)
    dtype = model_float_dtype(model)
    m: Any = model
    px = pixels if order is None else pixels[list(order)]
    with torch.no_grad():
        img = [m.encode_image(c.to(dev, dtype)).float().cpu() for c in _chunks(px, image_chunk)]
        txt = [m.encode_text(c.to(dev)).float().cpu() for c in _chunks(tokens, text_chunk)]
    images = torch.cat(img).double().numpy()
    if order is not None:
        back = np.empty_like(images)
        back[list(order)] = images
        images = back
    return Encoded(_normalise(images), _normalise(torch.cat(txt).double().numpy()))


def zero_shot(zs: ZeroShotHead, images: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """(N, D) and (C, D) normalised embeddings -> (N, C) probabilities through steadyclip's one head, float64.

    A row whose logits are not finite comes back all NaN - the ``non_finite`` check reports it -
    where the engine would raise.
    """
    out = np.full((images.shape[0], classes.shape[0]), np.nan)
    for i, row in enumerate(images):
        with contextlib.suppress(NumericsError):
            out[i] = zs.probs(row, classes)  # (C,): softmax for CLIP, per-label sigmoid for SigLIP
    return out


def class_embeddings(texts: np.ndarray, n_templates: int) -> np.ndarray:
    """(C*T, D) label-major prompt embeddings -> (C, D): the normalised mean over each label's templates."""
    n_cls = texts.shape[0] // n_templates
    return _normalise(texts.reshape(n_cls, n_templates, -1).mean(axis=1))


def head(model: torch.nn.Module, enc: Encoded, n_templates: int) -> np.ndarray:
    """Zero-shot probabilities (N, C): mean of template embeddings per class, then the model's own head."""
    return zero_shot(ZeroShotHead.from_model(model), enc.images, class_embeddings(enc.texts, n_templates))


def probs_of(model: torch.nn.Module, pixels: torch.Tensor, inputs: Inputs, **kw: Any) -> np.ndarray:
    return head(model, encode(model, pixels, inputs.tokens, **kw), inputs.n_templates)


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    """Largest absolute difference, ignoring entries non-finite on either side (those are non_finite's job)."""
    if a.shape != b.shape:
        raise ValueError(f"cannot compare shapes {a.shape} and {b.shape}")
    d = np.abs(a - b)
    d = d[np.isfinite(d)]
    return float(d.max()) if d.size else 0.0


def spread(runs: Sequence[np.ndarray]) -> float:
    """Max over every (image, label) of max-min across runs: how far results move run to run."""
    if len(runs) < 2:
        return 0.0
    stack = np.stack(runs)  # (R, N, C)
    with np.errstate(invalid="ignore"):
        d = np.nanmax(stack, axis=0) - np.nanmin(stack, axis=0)
    d = d[np.isfinite(d)]
    return float(d.max()) if d.size else 0.0


def top1(p: np.ndarray) -> list[int]:
    return [int(i) for i in np.argmax(np.nan_to_num(p, nan=-1.0), axis=-1)]


def top1_changes(reference: np.ndarray, others: Sequence[np.ndarray]) -> int:
    """How many images' top-1 label differs from the reference in at least one other run."""
    ref = top1(reference)
    changed = set()
    for o in others:
        for i, (a, b) in enumerate(zip(ref, top1(o))):
            if a != b:
                changed.add(i)
    return len(changed)


def top_margin(p: np.ndarray) -> float:
    """Smallest gap between the top-1 and top-2 probability over the images (how close to a flip)."""
    if p.shape[-1] < 2:
        return 1.0
    s = np.sort(np.nan_to_num(p, nan=0.0), axis=-1)
    return float((s[:, -1] - s[:, -2]).min())
