"""``resolve``: what the user typed -> the resolver for that kind of source.

Imports run one way: this module dispatches to ``local``, ``tags`` and ``hub``; none of them
imports it. ``hub`` is imported only when a download is asked for.
"""
from __future__ import annotations

import os

from steadyclip.errors import ModelSourceError
from steadyclip.model import integrity
from steadyclip.model.registry import DEMO_SPEC, get_spec
from steadyclip.model.sources.local import (
    resolve_bundled,
    resolve_file,
    resolve_local_dir,
)
from steadyclip.model.sources.spec import ResolvedSource
from steadyclip.model.sources.tags import builtin_arch, known_tags

__all__ = ["resolve"]


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
        source: model name; see :mod:`steadyclip.model.sources`.
        pretrained: a tag or a checkpoint path (for built-in architecture names only).
        revision: pin hub downloads to this commit (e.g. from a lockfile).
        expected_sha256: the weights hash a lockfile pins; a download that differs is re-fetched once.
        cache_dir: download cache for open_clip / the hub.
    Raises:
        ModelSourceError: unknown name or tag, missing file.
        IntegrityError: the weights are not the pinned bytes.
        InputError: ``expected_sha256`` is not 8 to 64 hex digits (before anything is downloaded).
    """
    source = source or DEMO_SPEC.model_id
    if expected_sha256 is not None:
        expected_sha256 = integrity.parse_sha256(expected_sha256)
    pretrained_s = os.fspath(pretrained) if pretrained is not None else None
    if get_spec(source) is not None and pretrained_s is None:
        return resolve_bundled(source)
    if source.startswith(("hf-hub:", "local-dir:")):
        if pretrained_s is not None:
            raise ModelSourceError(
                f"pretrained={pretrained_s!r} cannot be combined with {source!r}, which names its own weights"
            )
        if source.startswith("local-dir:"):
            return resolve_local_dir(source)
        from steadyclip.model.sources.hub import resolve_hf_hub

        return resolve_hf_hub(source, revision=revision, cache_dir=cache_dir, expected_sha256=expected_sha256)
    arch = builtin_arch(source)
    if pretrained_s is None:
        raise ModelSourceError(
            f"no weights given for {arch!r}; steadyclip never runs a randomly initialised model. "
            f"Pass pretrained=TAG (one of {known_tags(arch) or 'none known'}) or pretrained=PATH to a checkpoint."
        )
    import open_clip

    tag_cfg = open_clip.get_pretrained_cfg(arch, pretrained_s)
    if tag_cfg:
        from steadyclip.model.sources.hub import resolve_tag

        return resolve_tag(arch, pretrained_s, tag_cfg, revision=revision, cache_dir=cache_dir,
                           expected_sha256=expected_sha256)
    return resolve_file(arch, pretrained_s)
