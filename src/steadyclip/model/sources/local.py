"""Sources on this machine: the bundled model, a checkpoint file, an open_clip folder (``local-dir:``)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from steadyclip.errors import ModelSourceError
from steadyclip.model import integrity
from steadyclip.model.checkpoints import WEIGHT_SUFFIXES
from steadyclip.model.registry import get_spec, register_demo_config
from steadyclip.model.sources.spec import PREPROCESS_KEYS, ResolvedSource
from steadyclip.model.sources.tags import builtin_model_cfg, known_tags

__all__ = ["find_weights_in_dir", "read_open_clip_config", "resolve_bundled", "resolve_file", "resolve_local_dir"]


def resolve_bundled(model_id: str) -> ResolvedSource:
    """The bundled model, its weights checked against the SHA-256 its spec pins."""
    spec = get_spec(model_id)
    assert spec is not None
    register_demo_config()
    wf = spec.weights_file
    if wf is None or not wf.is_file():
        raise ModelSourceError(
            f"the bundled model {spec.model_id!r} has no weights file at {wf}; the package is incomplete. "
            "Reinstall steadyclip, or build the weights with `python -m steadyclip.demo.train`."
        )
    digest = integrity.verify_sha256(wf, spec.sha256, what=f"bundled weights of {spec.model_id}")
    return ResolvedSource(
        model_id=spec.model_id,
        kind="bundled",
        arch=spec.arch,
        create_name=spec.arch,
        model_cfg=builtin_model_cfg(spec.arch, False),
        pretrained=None,
        revision=None,
        weights_file=wf,
        weights_sha256=digest,
        tokenizer_name=spec.arch,
    )


def resolve_file(arch: str, path: str) -> ResolvedSource:
    """A local checkpoint file for a built-in architecture (hashed; nothing pins it)."""
    p = Path(path).expanduser()
    if not p.is_file():
        looks_like_path = os.sep in path or "/" in path or p.suffix in WEIGHT_SUFFIXES
        if looks_like_path:
            raise ModelSourceError(f"checkpoint file {p} does not exist")
        raise ModelSourceError(
            f"{path!r} is neither a pretrained tag of {arch!r} nor an existing checkpoint file. "
            f"Known tags: {known_tags(arch) or 'none'}."
        )
    digest = integrity.sha256_file(p)
    return ResolvedSource(
        model_id=arch,
        kind="file",
        arch=arch,
        create_name=arch,
        model_cfg=builtin_model_cfg(arch, False),
        pretrained=str(p.resolve()),
        revision=None,
        weights_file=p.resolve(),
        weights_sha256=digest,
        tokenizer_name=arch,
    )


def find_weights_in_dir(folder: Path) -> Path:
    """The weights file of an open_clip folder: one checkpoint, preferring safetensors."""
    preferred = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors", "model.safetensors",
                 "open_clip_pytorch_model.bin", "pytorch_model.bin", "open_clip_pytorch_model.pth", "model.pth")
    for name in preferred:
        if (folder / name).is_file():
            return folder / name
    found = sorted(f for f in folder.iterdir() if f.is_file() and f.suffix in WEIGHT_SUFFIXES)
    if len(found) == 1:
        return found[0]
    if not found:
        raise ModelSourceError(f"no weights file ({', '.join(WEIGHT_SUFFIXES)}) in {folder}")
    raise ModelSourceError(
        f"several weights files in {folder}: {[f.name for f in found]}; steadyclip will not guess. "
        f"Keep one, or name one of them {preferred[0]!r}."
    )


def read_open_clip_config(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(model_cfg, preprocess_cfg) from an ``open_clip_config.json``."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise ModelSourceError(f"{path} does not exist; an open_clip folder needs open_clip_config.json") from e
    except (OSError, ValueError) as e:
        raise ModelSourceError(f"{path} is not readable JSON ({e})") from e
    if not isinstance(doc, dict) or not isinstance(doc.get("model_cfg"), dict):
        raise ModelSourceError(f"{path} has no 'model_cfg' section; it is not an open_clip config")
    pp = doc.get("preprocess_cfg") or {}
    return doc["model_cfg"], {k: v for k, v in pp.items() if k in PREPROCESS_KEYS}


def resolve_local_dir(source: str) -> ResolvedSource:
    """``local-dir:PATH``: a folder with ``open_clip_config.json`` and one weights file."""
    folder = Path(source[len("local-dir:"):]).expanduser()
    if not folder.is_dir():
        raise ModelSourceError(f"{source!r}: folder {folder} does not exist")
    model_cfg, pp = read_open_clip_config(folder / "open_clip_config.json")
    wf = find_weights_in_dir(folder)
    digest = integrity.sha256_file(wf)
    return ResolvedSource(
        model_id=source,
        kind="local-dir",
        arch=source,
        create_name=f"local-dir:{folder.resolve()}",
        model_cfg=model_cfg,
        pretrained=None,
        revision=None,
        weights_file=wf.resolve(),
        weights_sha256=digest,
        preprocess_overrides=pp,
        tokenizer_name=f"local-dir:{folder.resolve()}",
    )
