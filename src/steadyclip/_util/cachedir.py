"""steadyclip's cache directory, and the small JSON maps of remembered verdicts kept in it.

Every on-disk cache (weights hashes, text embeddings, self-check and drift verdicts)
lives under :func:`cache_dir`, so ``$STEADYCLIP_CACHE_DIR`` moves all of them at once.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from steadyclip._util.atomic import write_atomic

_logger = logging.getLogger(__name__)

__all__ = ["VerdictStore", "cache_dir"]


def cache_dir() -> Path:
    """``$STEADYCLIP_CACHE_DIR`` (``~`` expanded) or the platform's user cache dir for steadyclip."""
    env = os.environ.get("STEADYCLIP_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("steadyclip"))


class VerdictStore:
    """A small JSON map in the cache dir (``name``.json); a lost update only costs a re-measurement."""

    def __init__(self, name: str) -> None:
        self.path = cache_dir() / f"{name}.json"

    def _read(self) -> dict[str, Any]:
        try:
            doc = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return doc if isinstance(doc, dict) else {}

    def get(self, key: str) -> Any:
        return self._read().get(key)

    def put(self, key: str, value: Any) -> None:
        doc = self._read()
        doc[key] = value
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(self.path, json.dumps(doc, sort_keys=True))
        except OSError as e:  # a read-only cache dir only costs a re-measurement next time
            _logger.info("could not remember a verdict in %s: %s", self.path, e)
