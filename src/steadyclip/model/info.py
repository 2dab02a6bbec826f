"""What identifies a loaded model: its preprocessing and its ``ModelInfo`` (locks, provenance).

Plain frozen records with no torch in them; ``steadyclip.model.loading`` fills them in and
re-exports both names.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["ModelInfo", "PreprocessConfig"]


@dataclass(frozen=True)
class PreprocessConfig:
    """How images must be prepared for this model (from the pretrained tag or model config)."""

    size: tuple[int, int]  # (height, width); open_clip's int sizes are normalised to (n, n)
    mode: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str
    resize_mode: str
    fill_color: int

    @classmethod
    def from_open_clip(cls, cfg: dict[str, Any]) -> PreprocessConfig:
        size = cfg["size"]
        return cls(
            size=(int(size[0]), int(size[1])) if isinstance(size, (list, tuple)) else (int(size), int(size)),
            mode=str(cfg.get("mode", "RGB")),
            mean=tuple(float(x) for x in cfg["mean"]),
            std=tuple(float(x) for x in cfg["std"]),
            interpolation=str(cfg["interpolation"]),
            resize_mode=str(cfg["resize_mode"]),
            fill_color=int(cfg.get("fill_color", 0)),
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["size"] = list(self.size)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d


@dataclass(frozen=True)
class ModelInfo:
    """Everything that identifies a loaded model; goes into locks and provenance.

    Attributes:
        model_id: the source as given ("steadyclip-demo", "ViT-B-32", "hf-hub:org/repo").
        arch: open_clip architecture (or schema name for hub/local-dir sources).
        source: kind of source: bundled | tag | file | hf-hub | local-dir.
        pretrained: tag or file path, if any.
        revision: hub commit the weights came from (None off the hub).
        weights_files: the weights file(s) read.
        weights_sha256: full SHA-256 of the weights file.
        fingerprint: ``integrity.state_fingerprint`` of the loaded state.
        config_hash: SHA-256 of the model config built.
        preprocess: image preprocessing in effect.
        tokenizer: tokenizer class (and HF name where there is one).
        context_length: tokens per text.
    """

    model_id: str
    arch: str
    source: str
    pretrained: str | None
    revision: str | None
    weights_files: tuple[str, ...]
    weights_sha256: str
    fingerprint: str
    config_hash: str
    preprocess: PreprocessConfig
    tokenizer: str
    context_length: int

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["weights_files"] = list(self.weights_files)
        d["preprocess"] = self.preprocess.to_dict()
        return d
