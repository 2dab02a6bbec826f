"""open_clip's built-in names: architectures, their pretrained tags, their model configs."""
from __future__ import annotations

import difflib
from typing import Any

from steadyclip.errors import ModelSourceError
from steadyclip.model.registry import DEMO_SPEC, get_spec, register_demo_config

__all__ = ["builtin_arch", "builtin_model_cfg", "known_tags"]


def builtin_arch(name: str) -> str:
    """The open_clip architecture ``name`` refers to (``/`` accepted for ``-``), or a clear error."""
    import open_clip

    spec = get_spec(name)
    if spec is not None:
        return spec.arch
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


def known_tags(arch: str) -> list[str]:
    """The pretrained tags open_clip knows for ``arch``, sorted."""
    import open_clip

    return sorted(open_clip.list_pretrained_tags_by_model(arch))


def builtin_model_cfg(arch: str, quick_gelu: bool) -> dict[str, Any]:
    """open_clip's model config for ``arch`` (with QuickGELU forced where a tag requires it)."""
    import open_clip

    cfg: dict[str, Any] = open_clip.get_model_config(arch)
    if quick_gelu:
        cfg["quick_gelu"] = True
    return cfg
