"""What a resolved source is: the :class:`ResolvedSource` record, its config hash, its preprocessing keys.

The bottom of the ``sources`` package: every resolver imports it, it imports no resolver.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from steadyclip.numerics import identity

__all__ = ["PREPROCESS_KEYS", "TAG_PREPROCESS_KEYS", "ResolvedSource", "config_hash"]

# open_clip's PreprocessCfg fields: what an open_clip_config.json's preprocess_cfg may set.
PREPROCESS_KEYS = ("size", "mode", "mean", "std", "interpolation", "resize_mode", "fill_color")
# What a pretrained tag may set: all but the size, which the architecture decides (open_clip sets it from
# the model's image size, and a forced size would override that).
TAG_PREPROCESS_KEYS = tuple(k for k in PREPROCESS_KEYS if k != "size")


@dataclass(frozen=True)
class ResolvedSource:
    """What to build and which (already verified) files to load into it.

    Attributes:
        model_id: the name as the user gave it (for display and locks).
        kind: "bundled" | "tag" | "file" | "hf-hub" | "local-dir".
        arch: open_clip architecture name, or the schema name for hub/local-dir.
        create_name: the name passed to ``open_clip.create_model`` (built without weights).
        model_cfg: the open_clip model config that will be built (for the config hash).
        pretrained: the tag or file path given, if any.
        revision: the hub commit the files came from (None off the hub).
        weights_file: the verified weights file.
        weights_sha256: its full SHA-256.
        quick_gelu: force QuickGELU (as the pretrained tag requires).
        preprocess_overrides: the tag's preprocessing (mean/std/interpolation/resize).
        tokenizer_name: the name for ``open_clip.get_tokenizer``.
    """

    model_id: str
    kind: str
    arch: str
    create_name: str
    model_cfg: dict[str, Any]
    pretrained: str | None
    revision: str | None
    weights_file: Path
    weights_sha256: str
    quick_gelu: bool = False
    preprocess_overrides: dict[str, Any] = field(default_factory=dict)
    tokenizer_name: str = ""


def config_hash(model_cfg: dict[str, Any]) -> str:
    """SHA-256 of a model config in the canonical JSON form (``identity.sha256_json``)."""
    return identity.sha256_json(model_cfg)
