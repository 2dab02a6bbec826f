"""Remembered verdicts of the engine's batch-invariance self-check (a JSON map in the cache dir)."""
from __future__ import annotations

import json
import logging

_logger = logging.getLogger(__name__)


class SelfCheckStore:
    """A small JSON map of self-check verdicts in the cache dir; a lost update only costs a re-check."""

    def __init__(self) -> None:
        from steadyclip.textcache import default_cache_dir

        self.path = default_cache_dir() / "batch-selfcheck.json"

    def get(self, key: str) -> str | None:
        try:
            value = json.loads(self.path.read_text()).get(key)
        except (OSError, ValueError, AttributeError):
            return None
        return value if isinstance(value, str) else None

    def put(self, key: str, value: str) -> None:
        import os
        import tempfile

        try:
            doc = json.loads(self.path.read_text()) if self.path.exists() else {}
            if not isinstance(doc, dict):
                doc = {}
        except (OSError, ValueError):
            doc = {}
        doc[key] = value
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".selfcheck-")
            with os.fdopen(fd, "w") as f:
                json.dump(doc, f)
            os.replace(tmp, self.path)
        except OSError as e:  # a read-only cache dir only costs a re-check next time
            _logger.info("could not remember the batch self-check in %s: %s", self.path, e)
