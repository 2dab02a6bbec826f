"""The on-disk text cache: hits, corruption detection, bounds, multi-process use."""
from __future__ import annotations

import multiprocessing as mp
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from steadyclip._util.cachedir import VerdictStore
from steadyclip.engine.textcache import TextCache
from steadyclip.model.integrity import get_hash_cache


def test_roundtrip_is_bitwise(tmp_path: Path) -> None:
    cache = TextCache(tmp_path / "c.db")
    vec = np.random.default_rng(0).standard_normal(64).astype(np.float32)
    cache.put_many({"k": vec})
    got = TextCache(tmp_path / "c.db").get_many(["k", "absent"])
    assert list(got) == ["k"]
    assert got["k"].tobytes() == vec.tobytes()


def test_corrupted_entry_is_dropped_not_used(tmp_path: Path) -> None:
    cache = TextCache(tmp_path / "c.db")
    cache.put_many({"k": np.ones(8, dtype=np.float32)})
    cache.close()
    with sqlite3.connect(tmp_path / "c.db") as db:
        db.execute("UPDATE entries SET value = ? WHERE key = 'k'", (np.zeros(8, dtype=np.float32).tobytes(),))
    cache = TextCache(tmp_path / "c.db")
    assert cache.get_many(["k"]) == {}
    assert cache.corrupt == 1
    assert len(cache) == 0


def test_size_bound_evicts_least_recently_used(tmp_path: Path) -> None:
    cache = TextCache(tmp_path / "c.db", max_bytes=3 * 400)
    for i in range(5):
        cache.put_many({f"k{i}": np.full(100, i, dtype=np.float32)})
    assert len(cache) == 3
    assert set(cache.get_many([f"k{i}" for i in range(5)])) == {"k2", "k3", "k4"}


def test_clear(tmp_path: Path) -> None:
    cache = TextCache(tmp_path / "c.db")
    cache.put_many({"a": np.ones(4, dtype=np.float32), "b": np.ones(4, dtype=np.float32)})
    assert cache.clear() == 2
    assert len(cache) == 0


def _writer(path: str, worker: int) -> None:
    cache = TextCache(path)
    for i in range(50):
        cache.put_many({f"w{worker}-{i}": np.full(16, worker * 1000 + i, dtype=np.float32)})
        cache.get_many([f"w{(worker + 1) % 4}-{i}"])


def test_concurrent_processes_share_one_cache(tmp_path: Path) -> None:
    path = str(tmp_path / "c.db")
    procs = [mp.get_context("spawn").Process(target=_writer, args=(path, w)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    cache = TextCache(path)
    got = cache.get_many([f"w{w}-{i}" for w in range(4) for i in range(50)])
    assert len(got) == 200
    assert all(v[0] == int(k[1]) * 1000 + int(k.split("-")[1]) for k, v in got.items())


def test_every_cache_follows_steadyclip_cache_dir_with_home_expanded(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("STEADYCLIP_CACHE_DIR", "~/sc-cache")
    want = tmp_path / "sc-cache"
    assert TextCache().path == want / "text-embeddings.sqlite3"
    assert get_hash_cache().path == want / "sha256-cache.json"
    assert VerdictStore("batch-selfcheck").path.parent == want
    VerdictStore("batch-selfcheck").put("k", "fixed-shape")
    assert VerdictStore("batch-selfcheck").get("k") == "fixed-shape"
    assert not (Path.cwd() / "~").exists()  # a literal "~" folder was never created
