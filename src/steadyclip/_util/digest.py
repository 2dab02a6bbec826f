"""Digests, computed one way everywhere: canonical JSON, and arrays by their exact bytes."""
from __future__ import annotations

import hashlib
import json
from typing import Any

__all__ = ["sha256_json"]


def sha256_json(obj: Any) -> str:
    """SHA-256 of the canonical JSON form of ``obj`` (sorted keys, compact, ``str`` for the rest)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
