"""What ``steadyclip doctor --demo / --model`` diagnoses, built the way a user's script builds it.

Raw open_clip, no steadyclip safety net - so the doctor sees what their code sees:
train mode, random weights for a missing tag, a checkpoint that does not match its lock.

    >>> source = resolve_source("ViT-B-32", "laion2b_s34b_b79k", demo=False, call_eval=False)
    >>> steadyclip.diagnose(loader=source.loader, tokenizer=source.tokenizer, images=..., labels=...)
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from steadyclip.errors import InputError, ModelSourceError

_logger = logging.getLogger(__name__)

__all__ = ["DoctorSource", "careless_demo_loader", "demo_images", "open_clip_loader", "resolve_source"]

_DEMO_IMAGES = 4
_DEMO_SEED = 2024


@dataclass(frozen=True)
class DoctorSource:
    """A model to diagnose: how to build it, its tokenizer, and what pins its weights."""

    loader: Callable[[], Any]  # builds (model, ...) the way the user's code does; called 2-3 times
    tokenizer: Callable[..., torch.Tensor]
    weights_file: Path | None  # the checkpoint the loader reads (hashed per load), if a file
    expected_sha256: str | None  # the bundled model's pinned hash
    bundled: bool  # the bundled demo model


def careless_demo_loader(weights: Path) -> Callable[[], tuple[Any, Any]]:
    """The bundled model built like a typical script: create_model + load_state_dict, and no ``.eval()``."""

    def load() -> tuple[Any, Any]:
        import open_clip
        from open_clip.transform import PreprocessCfg, image_transform_v2
        from safetensors.torch import load_file

        from steadyclip.model.loading import quiet_random_init_warning
        from steadyclip.model.registry import DEMO_ARCH, register_demo_config

        register_demo_config()
        with quiet_random_init_warning():  # open_clip warns before the script loads its weights: noise here
            model = open_clip.create_model(DEMO_ARCH)
        model.load_state_dict(load_file(str(weights)))
        preprocess = image_transform_v2(PreprocessCfg(**model.visual.preprocess_cfg), is_train=False)
        return model, preprocess  # note: still in train mode, as open_clip returned it

    return load


def open_clip_loader(model: str, pretrained: str | None) -> Callable[[], tuple[Any, ...]]:
    """``open_clip.create_model_and_transforms(model, pretrained=...)``, exactly as a user's script calls it."""

    def load() -> tuple[Any, ...]:
        import open_clip

        try:
            out: tuple[Any, ...] = open_clip.create_model_and_transforms(model, pretrained=pretrained)
        except (RuntimeError, ValueError, FileNotFoundError, KeyError) as e:
            raise ModelSourceError(
                f"open_clip could not build {model!r} with pretrained={pretrained!r}: {e}. "
                "Check the name with `python -c 'import open_clip; print(open_clip.list_pretrained())'`"
            ) from e
        return out

    return load


def _with_eval(loader: Callable[[], Any]) -> Callable[[], Any]:
    def load() -> Any:
        out = loader()
        out[0].eval()
        return out

    return load


def resolve_source(model: str | None, pretrained: str | None, *, demo: bool, call_eval: bool) -> DoctorSource:
    """The loader, tokenizer and pins for ``--demo`` or ``--model NAME [--pretrained TAG_OR_FILE]``.

    A bundled model id without ``pretrained`` is the bundled model (pinned by its hash); with
    ``pretrained`` it names its architecture with those weights.

    Raises:
        InputError: neither ``demo`` nor ``model``.
        ModelSourceError: the bundled weights are missing; open_clip has no tokenizer for the model.
    """
    from steadyclip.model.registry import DEMO_SPEC, get_spec, register_demo_config

    register_demo_config()  # so --model steadyclip-shapes (the demo architecture) resolves in open_clip
    spec = get_spec(model) if model is not None else None
    weights_file: Path | None
    if demo or (spec is not None and pretrained is None):
        wfile = DEMO_SPEC.weights_file
        if wfile is None or not wfile.is_file():
            raise ModelSourceError(f"the bundled model's weights are missing ({wfile}); reinstall steadyclip or "
                                   "build them with `python -m steadyclip.demo.train`")
        loader: Callable[[], Any] = careless_demo_loader(wfile)
        pinned = DEMO_SPEC.sha256 if DEMO_SPEC.sha256.strip("0") else None  # all zeros: an unset placeholder
        name, weights_file, bundled = DEMO_SPEC.arch, wfile, True
    elif model is not None:
        name = spec.arch if spec is not None else model  # the bundled id with other weights: its architecture
        loader, pinned, bundled = open_clip_loader(name, pretrained), None, False
        path = Path(pretrained).expanduser() if pretrained is not None else None
        weights_file = path if path is not None and path.is_file() else None
    else:
        raise InputError("say what to diagnose: demo=True, or a model name (and pretrained=TAG_OR_FILE)")
    return DoctorSource(_with_eval(loader) if call_eval else loader, _tokenizer(name), weights_file, pinned, bundled)


def _tokenizer(name: str) -> Callable[..., torch.Tensor]:
    import open_clip

    try:
        tok: Callable[..., torch.Tensor] = open_clip.get_tokenizer(name)
    except Exception as e:  # unknown name, hub unreachable: open_clip raises assorted types
        raise ModelSourceError(f"open_clip has no tokenizer for {name!r}: {type(e).__name__}: {e}") from e
    return tok


def demo_images() -> tuple[list[Any], list[str]]:
    """A few generated shape images for ``--demo`` and what each shows."""
    from steadyclip.demo.shapes import generate

    samples = generate(_DEMO_IMAGES, seed=_DEMO_SEED)
    return [im for im, _, _ in samples], [f"{c} {s} (generated)" for _, c, s in samples]
