"""Model sources: turn what the user typed into an architecture plus verified weight files.

Accepted sources (see ``steadyclip.loading.load``):

- ``"steadyclip-demo"`` (or ``None``): the bundled model, pinned by ``DEMO_SPEC.sha256``.
- ``"ViT-B-32", pretrained="laion2b_s34b_b79k"``: an open_clip built-in and tag,
  fetched with open_clip's download helpers; the SHA-256 a release URL carries is
  checked, hub downloads record (or are pinned to) a commit revision.
- ``"ViT-B-32", pretrained="/path/ckpt.safetensors"``: a local checkpoint file.
- ``"hf-hub:org/repo[@revision]"``: an open_clip repo on the Hugging Face hub.
- ``"local-dir:PATH"``: a folder with ``open_clip_config.json`` and weights.

Nothing here builds a model or reads tensors; it only decides which bytes to trust.
"""
from __future__ import annotations

import difflib
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from steadyclip import integrity
from steadyclip.errors import ModelSourceError
from steadyclip.registry import DEMO_SPEC, get_spec, register_demo_config

_logger = logging.getLogger(__name__)

__all__ = ["ResolvedSource", "config_hash", "resolve"]

_PREPROCESS_KEYS = ("size", "mode", "mean", "std", "interpolation", "resize_mode", "fill_color")
_WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")


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
    """SHA-256 of a model config as canonical JSON."""
    return hashlib.sha256(json.dumps(model_cfg, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def resolve(
    source: str | None,
    pretrained: str | os.PathLike[str] | None = None,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    expected_sha256: str | None = None,
) -> ResolvedSource:
    """Resolve a user-facing model source to an architecture and verified weights.

    Args:
        source: model name; see the module docstring.
        pretrained: a tag or a checkpoint path (for built-in architecture names only).
        revision: pin hub downloads to this commit (e.g. from a lockfile).
        expected_sha256: the weights hash a lockfile pins; a download that differs is re-fetched once.
        cache_dir: download cache for open_clip / the hub.
    Raises:
        ModelSourceError: unknown name or tag, missing file.
        IntegrityError: the weights are not the pinned bytes.
    """
    source = source or DEMO_SPEC.model_id
    pretrained_s = os.fspath(pretrained) if pretrained is not None else None
    spec = get_spec(source)
    if spec is not None and pretrained_s is None:
        return _resolve_bundled(source)
    if source.startswith(("hf-hub:", "local-dir:")):
        if pretrained_s is not None:
            raise ModelSourceError(
                f"pretrained={pretrained_s!r} cannot be combined with {source!r}, which names its own weights"
            )
        if source.startswith("local-dir:"):
            return _resolve_local_dir(source)
        from steadyclip.hub import resolve_hf_hub

        return resolve_hf_hub(source, revision=revision, cache_dir=cache_dir, expected_sha256=expected_sha256)
    arch = _builtin_arch(source)
    if pretrained_s is None:
        raise ModelSourceError(
            f"no weights given for {arch!r}; steadyclip never runs a randomly initialised model. "
            f"Pass pretrained=TAG (one of {_tags(arch) or 'none known'}) or pretrained=PATH to a checkpoint."
        )
    import open_clip

    tag_cfg = open_clip.get_pretrained_cfg(arch, pretrained_s)
    if tag_cfg:
        from steadyclip.hub import resolve_tag

        return resolve_tag(arch, pretrained_s, tag_cfg, revision=revision, cache_dir=cache_dir,
                           expected_sha256=expected_sha256)
    return _resolve_file(arch, pretrained_s)


def _builtin_arch(name: str) -> str:
    import open_clip

    if get_spec(name) is not None:
        return get_spec(name).arch  # type: ignore[union-attr]
    arch = name.replace("/", "-")
    if arch == DEMO_SPEC.arch:
        register_demo_config()
    if arch not in open_clip.list_models():
        close = difflib.get_close_matches(arch, open_clip.list_models(), n=5)
        hint = f" Did you mean one of {close}?" if close else ""
        raise ModelSourceError(
            f"unknown model {name!r}: not an open_clip architecture, a bundled model, 'hf-hub:ORG/REPO' "
            f"or 'local-dir:PATH'.{hint} `open_clip.list_models()` lists the architectures."
        )
    return arch


def _tags(arch: str) -> list[str]:
    import open_clip

    return sorted(open_clip.list_pretrained_tags_by_model(arch))


def builtin_model_cfg(arch: str, quick_gelu: bool) -> dict[str, Any]:
    import open_clip

    cfg: dict[str, Any] = open_clip.get_model_config(arch)
    if quick_gelu:
        cfg["quick_gelu"] = True
    return cfg


def _resolve_bundled(model_id: str) -> ResolvedSource:
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


def _resolve_file(arch: str, path: str) -> ResolvedSource:
    p = Path(path).expanduser()
    if not p.is_file():
        looks_like_path = os.sep in path or "/" in path or p.suffix in _WEIGHT_SUFFIXES
        if looks_like_path:
            raise ModelSourceError(f"checkpoint file {p} does not exist")
        raise ModelSourceError(
            f"{path!r} is neither a pretrained tag of {arch!r} nor an existing checkpoint file. "
            f"Known tags: {_tags(arch) or 'none'}."
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
    found = sorted(f for f in folder.iterdir() if f.is_file() and f.suffix in _WEIGHT_SUFFIXES)
    if len(found) == 1:
        return found[0]
    if not found:
        raise ModelSourceError(f"no weights file ({', '.join(_WEIGHT_SUFFIXES)}) in {folder}")
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
    return doc["model_cfg"], {k: v for k, v in pp.items() if k in _PREPROCESS_KEYS}


def _resolve_local_dir(source: str) -> ResolvedSource:
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


def move_aside(path: Path) -> Path:
    """Rename a file that failed its hash to ``<name>.corrupt-<timestamp>`` (kept for inspection)."""
    target = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}")
    os.replace(path, target)
    _logger.warning("moved %s aside to %s after a failed hash check", path, target)
    return target
