"""Digests, computed one way everywhere: canonical JSON, and arrays by their exact bytes.

An array's digest (:func:`sha256_array`) is the SHA-256 of its values laid out C-contiguous,
little-endian, in its dtype (or the ``dtype`` asked for): exactly ``np.ascontiguousarray(arr,
dtype=<little-endian dtype>).tobytes()``. Shape and dtype are *not* hashed: a caller that needs
them pinned records them beside the digest (the lockfile's probe stores ``shape``; its dtype is
always ``<f4``). Lockfiles' probe hashes, text-cache entries and the batch output's
``class_embeddings_sha256`` were written with this recipe before it lived here, so they stay valid.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["sha256_array", "sha256_json"]


def sha256_json(obj: Any) -> str:
    """SHA-256 of the canonical JSON form of ``obj`` (sorted keys, compact, ``str`` for the rest)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def sha256_array(arr: npt.ArrayLike, dtype: npt.DTypeLike | None = None) -> str:
    """SHA-256 of an array's C-contiguous little-endian bytes, in ``dtype`` if given (a cast) else its own.

    Example::

        sha256_array(np.zeros(2, "<f4")) == hashlib.sha256(bytes(8)).hexdigest()
    """
    a = np.asarray(arr)
    want = (a.dtype if dtype is None else np.dtype(dtype)).newbyteorder("<")
    return hashlib.sha256(np.ascontiguousarray(a, dtype=want).tobytes()).hexdigest()
