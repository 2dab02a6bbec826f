"""On-disk cache of class text embeddings, shared safely between processes.

One SQLite file (WAL mode) under the user cache dir. A key names everything
the embedding depends on (weights fingerprint, tokenizer, profile, micro-batch
shape, template set, label), so a hit is bitwise what a recompute would give.
Each value carries its own SHA-256: a corrupted entry is detected, dropped and
recomputed, never used. Size is bounded; least recently used entries go first.
"""
from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from steadyclip._util.cachedir import cache_dir
from steadyclip._util.digest import sha256_array

_logger = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 256 * 1024 * 1024


class TextCache:
    """Process-safe, size-bounded store of float32 vectors keyed by strings."""

    def __init__(self, path: str | os.PathLike[str] | None = None, *, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.path = Path(path) if path is not None else cache_dir() / "text-embeddings.sqlite3"
        self.max_bytes = max_bytes
        self.hits = 0
        self.misses = 0
        self.corrupt = 0
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, timeout=30.0, check_same_thread=False, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute(
                "CREATE TABLE IF NOT EXISTS entries (key TEXT PRIMARY KEY, value BLOB NOT NULL, "
                "digest TEXT NOT NULL, dim INTEGER NOT NULL, used REAL NOT NULL)"
            )
            self._conn = conn
        return self._conn

    def get_many(self, keys: Iterable[str]) -> dict[str, np.ndarray]:
        """The stored vectors for whichever of ``keys`` are present and intact."""
        keys = list(keys)
        found: dict[str, np.ndarray] = {}
        if not keys:
            return found
        with self._lock:
            db = self._db()
            bad: list[str] = []
            for start in range(0, len(keys), 500):
                chunk = keys[start : start + 500]
                marks = ",".join("?" * len(chunk))
                rows = db.execute(f"SELECT key, value, digest, dim FROM entries WHERE key IN ({marks})", chunk)
                for key, value, digest, dim in rows:
                    blob = bytes(value)
                    if len(blob) != 4 * dim or sha256_array(np.frombuffer(blob, dtype="<f4")) != digest:
                        bad.append(key)
                        continue
                    found[key] = np.frombuffer(blob, dtype="<f4").copy()
            if bad:
                self.corrupt += len(bad)
                _logger.warning("text cache: %d corrupted entries in %s dropped and recomputed", len(bad), self.path)
                db.executemany("DELETE FROM entries WHERE key = ?", [(k,) for k in bad])
            now = time.time()
            db.executemany("UPDATE entries SET used = ? WHERE key = ?", [(now, k) for k in found])
        self.hits += len(found)
        self.misses += len(keys) - len(found)
        return found

    def put_many(self, items: dict[str, np.ndarray]) -> None:
        """Store vectors (float32), then evict least recently used entries over the size bound."""
        if not items:
            return
        now = time.time()
        rows = []
        for key, vec in items.items():
            arr = np.ascontiguousarray(vec, dtype="<f4")
            rows.append((key, arr.tobytes(), sha256_array(arr), arr.size, now))
        with self._lock:
            db = self._db()
            db.execute("BEGIN IMMEDIATE")
            try:
                db.executemany("INSERT OR REPLACE INTO entries VALUES (?, ?, ?, ?, ?)", rows)
                self._evict(db)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

    def _evict(self, db: sqlite3.Connection) -> None:
        total = db.execute("SELECT COALESCE(SUM(LENGTH(value)), 0) FROM entries").fetchone()[0]
        if total <= self.max_bytes:
            return
        excess = total - self.max_bytes
        victims: list[str] = []
        for key, size in db.execute("SELECT key, LENGTH(value) FROM entries ORDER BY used ASC"):
            victims.append(key)
            excess -= size
            if excess <= 0:
                break
        db.executemany("DELETE FROM entries WHERE key = ?", [(k,) for k in victims])
        _logger.info("text cache: evicted %d entries to stay under %d bytes", len(victims), self.max_bytes)

    def __len__(self) -> int:
        with self._lock:
            return int(self._db().execute("SELECT COUNT(*) FROM entries").fetchone()[0])

    def clear(self) -> int:
        """Delete every entry; returns how many there were."""
        with self._lock:
            db = self._db()
            n = int(db.execute("SELECT COUNT(*) FROM entries").fetchone()[0])
            db.execute("DELETE FROM entries")
            db.execute("VACUUM")
        return n

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
