"""Known models: architecture, weights source, pinned hash and preprocessing.

The bundled demo model is the one entry that ships with the package; other
models are open_clip built-ins resolved through open_clip's pretrained table
(see ``loading``), whose URLs carry a SHA-256 (full or prefix) that we check.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cache
from pathlib import Path

_logger = logging.getLogger(__name__)

DEMO_DIR = Path(__file__).resolve().parents[1] / "demo"
DEMO_ARCH = "steadyclip-shapes"
DEMO_MODEL_ID = "steadyclip-demo"
# The template set of a model without a spec (open_clip architectures, files, hub repos).
DEFAULT_TEMPLATES = "photo"

# The demo's label set: what it was trained on (8 colours x 6 shapes).
DEMO_COLOURS: tuple[str, ...] = ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink")
DEMO_SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "ring")


def demo_labels() -> list[str]:
    """The bundled model's full label set, e.g. ``"red circle"``."""
    return [f"{c} {s}" for c in DEMO_COLOURS for s in DEMO_SHAPES]


@dataclass(frozen=True)
class ModelSpec:
    """One known model: what to build and which exact bytes to load into it.

    Attributes:
        model_id: the name users type (``steadyclip-demo``).
        arch: open_clip model config name.
        weights_file: where the weights live (bundled) or ``None`` (downloaded).
        sha256: full SHA-256 of the weights file; loading refuses any other bytes.
        config_file: an open_clip model config to register before building.
        default_templates: the prompt template set classification uses by default.
    """

    model_id: str
    arch: str
    weights_file: Path | None
    sha256: str
    config_file: Path | None = None
    default_templates: str = DEFAULT_TEMPLATES


DEMO_SPEC = ModelSpec(
    model_id=DEMO_MODEL_ID,
    arch=DEMO_ARCH,
    weights_file=DEMO_DIR / "steadyclip-shapes.safetensors",
    # Written by `python -m steadyclip.demo.train`; a test re-hashes the file.
    sha256="047ec1a9ebd4f7d9b84f0946a9b6982c03c255eb6064400aca3eae9d95a6f2e7",
    config_file=DEMO_DIR / "steadyclip-shapes.json",
    default_templates="photo",
)

_SPECS: dict[str, ModelSpec] = {DEMO_MODEL_ID: DEMO_SPEC, "demo": DEMO_SPEC}


def get_spec(model_id: str) -> ModelSpec | None:
    """The bundled spec for ``model_id``, or ``None`` if it is not bundled."""
    return _SPECS.get(model_id)


def default_templates(model_id: str) -> str:
    """The prompt template set (a built-in name or a file) ``model_id`` classifies with by default."""
    spec = get_spec(model_id)
    return spec.default_templates if spec is not None else DEFAULT_TEMPLATES


@cache
def register_demo_config() -> None:
    """Make the demo architecture known to open_clip (idempotent)."""
    import open_clip

    if DEMO_ARCH not in open_clip.list_models():
        assert DEMO_SPEC.config_file is not None
        open_clip.add_model_config(DEMO_SPEC.config_file)
        _logger.debug("registered open_clip config %s", DEMO_ARCH)
