"""What a result records so that ``steadyclip verify`` can recompute it later: its recipe.

Digests, not copies: the engine settings (one serialised form, :meth:`EngineSettings.to_dict`),
where the model came from (its hash is in the provenance), the labels and template set a
classification used, and the SHA-256 of every input. Every front end (batch files, the CLI's
JSON documents, server answers) writes this same section.
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from steadyclip.engine.facade import Engine

__all__ = ["RECIPE_VERSION", "file_sha256", "model_record", "recipe"]

RECIPE_VERSION = 1


def model_record(engine: Engine) -> dict[str, Any]:
    """Where the weights came from (``load``'s arguments); the weights' hash is in the provenance."""
    info = engine.loaded.info
    return {"model_id": info.model_id, "arch": info.arch, "source": info.source, "pretrained": info.pretrained,
            "revision": info.revision}


def recipe(engine: Engine, *, labels: Sequence[str] | None = None, templates: str | None = None,
           top_k: int | None = None) -> dict[str, Any]:
    """The recipe section of a result document (see the module docstring)."""
    # the replica count is layout, never identity: a file made on 1 core and on 64 must be the same bytes
    doc: dict[str, Any] = {"version": RECIPE_VERSION, "settings": engine.settings.replace(replicas=None).to_dict(),
                           "model": model_record(engine)}
    if labels is not None:
        doc |= {"labels": list(labels), "templates": templates, "top_k": top_k}
    return doc


def file_sha256(path: str | os.PathLike[str]) -> str | None:
    """SHA-256 of a file's bytes, or ``None`` when it cannot be read (its row is an error row)."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except OSError:
        return None
    return digest.hexdigest()
