"""Model sources: turn what the user typed into an architecture plus verified weight files.

Accepted sources (see ``steadyclip.model.loading.load``):

- ``"steadyclip-demo"`` (or ``None``): the bundled model, pinned by ``DEMO_SPEC.sha256``.
- ``"ViT-B-32", pretrained="laion2b_s34b_b79k"``: an open_clip built-in and tag,
  fetched with open_clip's download helpers; the SHA-256 a release URL carries is
  checked, hub downloads record (or are pinned to) a commit revision.
- ``"ViT-B-32", pretrained="/path/ckpt.safetensors"``: a local checkpoint file.
- ``"hf-hub:org/repo[@revision]"``: an open_clip repo on the Hugging Face hub.
- ``"local-dir:PATH"``: a folder with ``open_clip_config.json`` and weights.

Nothing here builds a model or reads tensors; it only decides which bytes to trust.

Modules, each importing only those below it: ``resolver`` (dispatch) -> ``hub``
(downloads, verified on arrival) -> ``local`` (bundled, file, folder) -> ``tags``
(open_clip's built-in names) and ``spec`` (``ResolvedSource``, ``config_hash``).
"""
from __future__ import annotations

from steadyclip.model.sources.resolver import resolve
from steadyclip.model.sources.spec import ResolvedSource, config_hash

__all__ = ["ResolvedSource", "config_hash", "resolve"]
