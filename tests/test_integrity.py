"""Integrity: file hashes and their cache, state fingerprints, tamper detection, lockfiles."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from steadyclip.errors import InputError, IntegrityError, LockMismatchError
from steadyclip.model import registry
from steadyclip.model.integrity import (
    HashCache,
    buffers_fingerprint,
    get_hash_cache,
    sha256_file,
    state_fingerprint,
    verify_sha256,
)
from steadyclip.model.loading import load
from steadyclip.model.lockfile import compare_lock, make_lock, read_lock, write_lock

DEMO_ARCH = registry.DEMO_ARCH


# --- sha256_file and the stat-keyed cache ---------------------------------------------

@pytest.fixture
def big_file(tmp_path: Path) -> Path:
    path = tmp_path / "big.bin"
    chunk = hashlib.sha256(b"seed").digest() * (1 << 15)  # 1 MiB, not all zeros
    with open(path, "wb") as f:
        f.writelines(chunk for _ in range(48))
        f.write(b"tail not on a chunk boundary")
    return path


def test_sha256_matches_hashlib(big_file: Path) -> None:
    assert sha256_file(big_file, cache=None) == hashlib.sha256(big_file.read_bytes()).hexdigest()


def test_unchanged_file_is_not_rehashed(big_file: Path) -> None:
    cache = get_hash_cache()
    digest = sha256_file(big_file)
    assert (cache.hits, cache.misses) == (0, 1)
    assert sha256_file(big_file) == digest
    assert (cache.hits, cache.misses) == (1, 1)
    # Another process (a fresh cache object on the same JSON) also gets a hit.
    other = HashCache(cache.path)
    assert sha256_file(big_file, cache=other) == digest and other.hits == 1


def test_cache_lives_under_steadyclip_cache_dir(big_file: Path) -> None:
    sha256_file(big_file)
    path = Path(os.environ["STEADYCLIP_CACHE_DIR"]) / "sha256-cache.json"
    doc = json.loads(path.read_text())
    entry = doc["entries"][str(big_file.resolve())]
    assert {"size", "mtime_ns", "inode", "sha256"} <= entry.keys()


def test_touched_file_is_rehashed(big_file: Path) -> None:
    cache = get_hash_cache()
    sha256_file(big_file)
    st = big_file.stat()
    os.utime(big_file, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    sha256_file(big_file)
    assert cache.misses == 2 and cache.hits == 0


def test_changed_file_with_restored_mtime_is_rehashed(big_file: Path) -> None:
    """Even an edit that puts the mtime back is caught: ctime is part of the key."""
    good = sha256_file(big_file)
    st = big_file.stat()
    with open(big_file, "r+b") as f:
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 0x01]))
    os.utime(big_file, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert sha256_file(big_file) != good


def test_corrupt_cache_file_is_ignored_not_fatal(big_file: Path) -> None:
    cache = get_hash_cache()
    cache.path.parent.mkdir(parents=True, exist_ok=True)
    cache.path.write_text("{not json")
    assert sha256_file(big_file) == hashlib.sha256(big_file.read_bytes()).hexdigest()
    assert sha256_file(big_file) and cache.hits == 1  # rewritten cleanly


def test_second_load_of_unchanged_weights_hits_the_cache(demo_copy: Path) -> None:
    cache = get_hash_cache()
    load(DEMO_ARCH, pretrained=demo_copy)
    misses = cache.misses
    load(DEMO_ARCH, pretrained=demo_copy)
    assert cache.misses == misses and cache.hits >= 1


# --- verify_sha256: the one rule for an expected hash (integrity.parse_sha256/sha256_matches) ---

def test_verify_sha256_takes_the_full_digest_or_a_prefix_in_any_case(big_file: Path) -> None:
    digest = hashlib.sha256(big_file.read_bytes()).hexdigest()
    assert verify_sha256(big_file, digest.upper(), cache=None) == digest
    assert verify_sha256(big_file, f" {digest[:8]}\n", cache=None) == digest
    wrong = ("1" if digest[0] == "0" else "0") + digest[1:12]
    with pytest.raises(IntegrityError, match=f"expected {wrong}, actual {digest}"):
        verify_sha256(big_file, wrong, cache=None)


@pytest.mark.parametrize("bad", ["", "abc1234", "g" * 8, "a" * 65])
def test_verify_sha256_refuses_a_malformed_hash_before_reading_the_file(tmp_path: Path, bad: str) -> None:
    with pytest.raises(InputError, match="8 to 64 hex digits"):
        verify_sha256(tmp_path / "not-there.bin", bad)  # InputError, not FileNotFoundError: checked first


# --- a flipped bit or a truncation is caught before any inference ------------------------

@pytest.fixture
def pinned_bundle(demo_copy: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    spec = dataclasses.replace(registry.DEMO_SPEC, weights_file=demo_copy, sha256=sha256_file(demo_copy, cache=None))
    monkeypatch.setitem(registry._SPECS, "steadyclip-demo", spec)
    return demo_copy


def _flip(path: Path, bit: int) -> None:
    with open(path, "r+b") as f:
        f.seek(bit // 8)
        b = f.read(1)[0]
        f.seek(bit // 8)
        f.write(bytes([b ^ (1 << (bit % 8))]))


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fraction=st.floats(min_value=0.0, max_value=1.0, exclude_max=True))
def test_single_flipped_bit_anywhere_is_caught(pinned_bundle: Path, fraction: float) -> None:
    bit = int(fraction * pinned_bundle.stat().st_size * 8)
    expected = registry._SPECS["steadyclip-demo"].sha256
    _flip(pinned_bundle, bit)
    try:
        with pytest.raises(IntegrityError) as e:
            load()
        msg = str(e.value)
        assert str(pinned_bundle) in msg and expected in msg
        assert sha256_file(pinned_bundle, cache=None) in msg  # the actual hash
    finally:
        _flip(pinned_bundle, bit)
    assert load().info.weights_sha256 == expected  # restored bytes load again


def test_truncated_file_is_caught(pinned_bundle: Path) -> None:
    data = pinned_bundle.read_bytes()
    pinned_bundle.write_bytes(data[: len(data) - 1])
    with pytest.raises(IntegrityError, match="expected .* actual"):
        load()


def test_flipped_bit_against_a_lock_names_file_and_both_hashes(demo_copy: Path, tmp_path: Path) -> None:
    lock = tmp_path / "steadyclip.lock"
    good = load(DEMO_ARCH, pretrained=demo_copy)
    write_lock(lock, good.info)
    _flip(demo_copy, 8 * 5000 + 3)
    with pytest.raises(LockMismatchError) as e:
        load(DEMO_ARCH, pretrained=demo_copy, lock=lock)
    assert e.value.field == "weights_sha256"
    assert e.value.expected == good.info.weights_sha256
    assert str(demo_copy) in str(e.value) and str(e.value.actual) in str(e.value)


# --- fingerprints --------------------------------------------------------------------------

def test_state_fingerprint_is_order_and_format_independent(demo_arch_checkpoint: Path) -> None:
    sd = load_file(str(demo_arch_checkpoint))
    reordered = dict(reversed(list(sd.items())))
    assert state_fingerprint(sd) == state_fingerprint(reordered)
    changed = dict(sd)
    changed["logit_scale"] = sd["logit_scale"].clone().to(torch.float64)
    assert state_fingerprint(changed) != state_fingerprint(sd)  # dtype is part of it
    renamed = dict(sd)
    renamed["logit_scale_x"] = renamed.pop("logit_scale")
    assert state_fingerprint(renamed) != state_fingerprint(sd)


def test_state_fingerprint_handles_bf16_and_scalars() -> None:
    a = {"w": torch.ones(3, dtype=torch.bfloat16), "s": torch.tensor(2.0)}
    b = {"w": torch.ones(3, dtype=torch.bfloat16), "s": torch.tensor(2.0)}
    assert state_fingerprint(a) == state_fingerprint(b)
    b["w"][1] = 1.0078125  # next bf16 value after 1.0
    assert state_fingerprint(a) != state_fingerprint(b)


def test_buffers_fingerprint_sees_batchnorm_stats_and_num_batches() -> None:
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).eval()
    before = buffers_fingerprint(net)
    assert buffers_fingerprint(net) == before
    net.train()
    with torch.no_grad():
        net(torch.randn(2, 3, 8, 8))
    assert buffers_fingerprint(net) != before


def test_buffers_fingerprint_sees_swapped_parameter() -> None:
    lin = torch.nn.Linear(1000, 1000)
    before = buffers_fingerprint(lin)
    lin.weight = torch.nn.Parameter(lin.weight.detach().clone())  # same values, new tensor
    assert buffers_fingerprint(lin) != before


# --- lockfiles -----------------------------------------------------------------------------

def test_lock_roundtrip_and_extra_sections(demo_arch_checkpoint: Path, tmp_path: Path) -> None:
    m = load(DEMO_ARCH, pretrained=demo_arch_checkpoint)
    path = tmp_path / "steadyclip.lock"
    written = write_lock(path, m.info, probe={"outputs": [1.0, 2.0]})
    doc = read_lock(path)
    assert doc == written
    assert doc["steadyclip_lock"] == 1 and doc["probe"] == {"outputs": [1.0, 2.0]}
    assert doc["model"]["fingerprint"] == m.info.fingerprint
    assert {"torch", "open_clip_torch", "python"} <= doc["versions"].keys()
    compare_lock(doc, m.info)
    assert load(DEMO_ARCH, pretrained=demo_arch_checkpoint, lock=path).info == m.info


def test_lock_written_with_the_old_version_map_reads_without_warnings(
        demo_arch_checkpoint: Path, caplog: pytest.LogCaptureFixture) -> None:
    import platform
    from importlib import metadata

    m = load(DEMO_ARCH, pretrained=demo_arch_checkpoint)
    doc = make_lock(m.info)
    # the map locks carried before identity.software_stack(): distribution versions, torch without its build tag
    doc["versions"] = {"python": platform.python_version(), **{d: metadata.version(d) for d in (
        "torch", "open_clip_torch", "safetensors", "timm", "steadyclip")}}
    with caplog.at_level("WARNING", logger="steadyclip.model.lockfile"):
        compare_lock(doc, m.info)
    assert not caplog.records
    doc["versions"]["torch"] = "1.0.0"
    doc["versions"]["timm"] = "0.0.1"
    with caplog.at_level("WARNING", logger="steadyclip.model.lockfile"):
        compare_lock(doc, m.info)
    assert sorted(r.getMessage().split()[4] for r in caplog.records) == ["timm", "torch"]


@pytest.mark.parametrize(
    ("field", "value", "reported"),
    [
        ("fingerprint", "0" * 64, "fingerprint"),
        ("config_hash", "1" * 64, "config_hash"),
        ("arch", "ViT-B-32", "arch"),
        ("preprocess", {"interpolation": "bilinear"}, "preprocess.interpolation"),
        ("tokenizer", "HFTokenizer:x", "tokenizer"),
    ],
)
def test_lock_mismatch_names_field_and_both_values(demo_arch_checkpoint: Path, tmp_path: Path, field: str,
                                                   value: object, reported: str) -> None:
    m = load(DEMO_ARCH, pretrained=demo_arch_checkpoint)
    doc = make_lock(m.info)
    if isinstance(value, dict):
        doc["model"][field].update(value)
    else:
        doc["model"][field] = value
    with pytest.raises(LockMismatchError) as e:
        compare_lock(doc, m.info)
    assert e.value.field == reported
    assert repr(value if not isinstance(value, dict) else "bilinear") in str(e.value)
    assert e.value.actual != e.value.expected


def test_read_lock_rejects_non_locks(tmp_path: Path) -> None:
    bad = tmp_path / "x.lock"
    bad.write_text('{"hello": 1}')
    with pytest.raises(InputError, match="not a steadyclip lockfile"):
        read_lock(bad)
    bad.write_text('{"steadyclip_lock": 99, "model": {}}')
    with pytest.raises(InputError, match="format version 99"):
        read_lock(bad)
    with pytest.raises(InputError, match="does not exist"):
        read_lock(tmp_path / "missing.lock")
