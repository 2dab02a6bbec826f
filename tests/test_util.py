"""The one atomic write and the one array digest that every layer uses."""
from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path

import numpy as np
import pytest

from steadyclip._util.atomic import atomic_path, write_atomic
from steadyclip._util.digest import sha256_array

# sha256 of the 12 bytes of float32 [1, 2, 3] little-endian: pinned, because lockfiles' probe
# hashes, text-cache entries and Parquet metadata already carry digests made this way.
_F32_123 = "8e628779e6a74ee0b36991c10158f63cafec7d340ad4e075592502c8708524dd"


def test_array_digest_is_pinned_and_is_the_sha256_of_the_little_endian_bytes() -> None:
    arr = np.array([1.0, 2.0, 3.0], dtype="<f4")
    assert sha256_array(arr) == hashlib.sha256(arr.tobytes()).hexdigest()
    assert sha256_array(arr) == _F32_123
    # Same values, other layouts: big-endian storage, a strided view, a cast from float64.
    assert sha256_array(arr.astype(">f4")) == _F32_123
    assert sha256_array(np.array([1, 9, 2, 9, 3], dtype="<f4")[::2]) == _F32_123
    assert sha256_array(np.array([1.0, 2.0, 3.0]), "<f4") == _F32_123
    # Shape is not part of the digest; dtype is, through the bytes.
    assert sha256_array(arr.reshape(1, 3)) == _F32_123
    assert sha256_array(arr.astype(np.float64)) != _F32_123


def test_lockfile_probe_hash_is_unchanged_by_the_shared_digest() -> None:
    from steadyclip.engine.probe import _pack, _unpack

    arr = np.arange(6, dtype=np.float32).reshape(2, 3) / 7
    doc = _pack(arr)
    raw = base64.b64decode(doc["data"])
    assert doc["sha256"] == hashlib.sha256(raw).hexdigest()  # the recipe locks were written with
    assert np.array_equal(_unpack(doc), arr)


def test_atomic_write_replaces_the_file_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "lock.json"
    target.write_text("old")
    write_atomic(target, "new")
    assert target.read_text() == "new"
    write_atomic(target, b"\x00bytes")
    assert target.read_bytes() == b"\x00bytes"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lock.json"]


def test_atomic_write_gives_plain_file_permissions(tmp_path: Path) -> None:
    plain, atomic = tmp_path / "plain", tmp_path / "atomic"
    plain.write_text("x")
    write_atomic(atomic, "x")
    assert atomic.stat().st_mode == plain.stat().st_mode  # not mkstemp's 0600


def test_a_failed_write_keeps_the_old_file_and_removes_the_temp(tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="disk full"), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("disk full")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["out.bin"]


def test_atomic_write_into_a_missing_folder_raises_oserror(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        write_atomic(tmp_path / "no" / "such" / "file", "x")
