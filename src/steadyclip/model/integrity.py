"""Integrity: file hashes (with a stat-keyed cache) and fingerprints of model state.

Three checks at three prices:

- ``sha256_file``: the exact bytes of a weights file. Streamed in 1 MiB chunks;
  the digest is cached under the user cache dir, keyed by the file's path, size,
  mtime, ctime and inode, so an unchanged file is hashed once, not on every start.
- ``state_fingerprint``: the exact tensors a model holds (names, dtypes, shapes,
  bytes), independent of the file format they came from.
- ``buffers_fingerprint``: a cheap in-memory tamper check, run before every
  engine call (every buffer in full, a fixed sample of every parameter, and each
  parameter's storage identity and in-place version counter).

Lockfiles (``write_lock``/``read_lock``/``compare_lock``) live in ``steadyclip.model.lockfile``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Literal

import torch

from steadyclip._util.atomic import write_atomic
from steadyclip._util.cachedir import cache_dir
from steadyclip.errors import InputError, IntegrityError

_logger = logging.getLogger(__name__)

__all__ = [
    "CHUNK_SIZE",
    "HashCache",
    "buffers_fingerprint",
    "fingerprint_from_digests",
    "get_hash_cache",
    "param_sample_fingerprint",
    "parse_sha256",
    "sha256_file",
    "sha256_matches",
    "state_fingerprint",
    "tensor_digests",
    "verify_sha256",
]

CHUNK_SIZE = 1 << 20  # 1 MiB: large enough to amortise syscalls, small enough to stream
_CACHE_VERSION = 1
_MAX_ENTRIES = 4096  # the cache is a convenience; keep the JSON small


def _stat_key(path: Path) -> dict[str, int]:
    st = path.stat()
    # ctime cannot be set back by a user (unlike mtime via os.utime), so an
    # edit that restores the mtime still misses the cache and gets re-hashed.
    return {
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "ctime_ns": st.st_ctime_ns,
        "inode": st.st_ino,
    }


class HashCache:
    """SHA-256 digests of files, keyed by (path, size, mtime_ns, ctime_ns, inode).

    Stored as one JSON document, written atomically under a file lock so several
    processes can share it. ``hits``/``misses`` count lookups in this process.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.hits = 0
        self.misses = 0

    def _read(self) -> dict[str, dict[str, object]]:
        try:
            doc = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            _logger.warning("ignoring unreadable hash cache %s (%s); files will be re-hashed", self.path, e)
            return {}
        if not isinstance(doc, dict) or doc.get("version") != _CACHE_VERSION:
            return {}
        entries = doc.get("entries")
        return entries if isinstance(entries, dict) else {}

    def lookup(self, path: str | os.PathLike[str]) -> str | None:
        """The cached digest of ``path`` if the file is unchanged since it was stored, else ``None``."""
        p = Path(path).resolve()
        entry = self._read().get(str(p))
        try:
            key = _stat_key(p)
        except OSError:
            key = None
        if entry is not None and key is not None and all(entry.get(k) == v for k, v in key.items()):
            digest = entry.get("sha256")
            if isinstance(digest, str):
                self.hits += 1
                return digest
        self.misses += 1
        return None

    def store(self, path: str | os.PathLike[str], digest: str, *, stat_key: Mapping[str, int] | None = None) -> None:
        """Remember ``digest`` for ``path`` as it is now (or as it was at ``stat_key``)."""
        from filelock import FileLock

        p = Path(path).resolve()
        entry: dict[str, object] = dict(stat_key if stat_key is not None else _stat_key(p))
        entry["sha256"] = digest
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with FileLock(str(self.path) + ".lock", timeout=30):
                entries = self._read()
                entries.pop(str(p), None)
                entries[str(p)] = entry
                while len(entries) > _MAX_ENTRIES:  # dicts keep insertion order: drop the oldest
                    entries.pop(next(iter(entries)))
                write_atomic(self.path, json.dumps({"version": _CACHE_VERSION, "entries": entries}, indent=1, sort_keys=True))
        except OSError as e:  # a read-only cache dir must not stop a load
            _logger.warning("could not write hash cache %s (%s)", self.path, e)


_CACHES: dict[Path, HashCache] = {}


def get_hash_cache() -> HashCache:
    """The process-wide cache for the current cache dir (one instance per dir, so counters add up)."""
    path = cache_dir() / "sha256-cache.json"
    if path not in _CACHES:
        _CACHES[path] = HashCache(path)
    return _CACHES[path]


def sha256_file(
    path: str | os.PathLike[str], *, cache: HashCache | None | Literal["default"] = "default"
) -> str:
    """Full SHA-256 (hex) of a file, streamed in 1 MiB chunks; cached by stat key.

    Args:
        path: the file.
        cache: a ``HashCache``, ``None`` to always hash, or ``"default"`` for the shared one.
    Raises:
        FileNotFoundError: no such file.
    """
    p = Path(path)
    hc = get_hash_cache() if cache == "default" else cache
    assert not isinstance(hc, str)
    if hc is not None:
        cached = hc.lookup(p)
        if cached is not None:
            return cached
    before = _stat_key(p)
    h = hashlib.sha256()
    buf = bytearray(CHUNK_SIZE)
    view = memoryview(buf)
    with open(p, "rb") as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    digest = h.hexdigest()
    if hc is not None:
        if _stat_key(p) == before:
            hc.store(p, digest, stat_key=before)
        else:
            _logger.warning("%s changed while it was hashed; not caching its digest", p)
    return digest


def verify_sha256(
    path: str | os.PathLike[str],
    expected: str,
    *,
    what: str = "weights file",
    cache: HashCache | None | Literal["default"] = "default",
) -> str:
    """Hash ``path`` and check it against ``expected`` (see :func:`parse_sha256`).

    Returns:
        The full actual digest.
    Raises:
        InputError: ``expected`` is not 8 to 64 hex digits (checked before the file is read).
        IntegrityError: naming the file, the expected and the actual hash.
    """
    expected = parse_sha256(expected)
    actual = sha256_file(path, cache=cache)
    if not sha256_matches(actual, expected):
        raise IntegrityError(
            f"{what} {os.fspath(path)} failed its SHA-256 check: expected {expected}, actual {actual}. "
            "The file is corrupt, truncated or not the file that was pinned; delete it and fetch it again."
        )
    return actual


# --- fingerprints of in-memory state -------------------------------------------------


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous().reshape(-1)
    # Reinterpret as bytes (works for bf16 and other dtypes numpy lacks); no copy when contiguous.
    return memoryview(t.view(torch.uint8).numpy())  # type: ignore[arg-type]


def _header(name: str, t: torch.Tensor) -> bytes:
    return (json.dumps([name, str(t.dtype).removeprefix("torch."), list(t.shape)]) + "\n").encode()


def _memory_header(name: str, t: torch.Tensor) -> bytes:
    """:func:`_header` for the in-memory checks (never stored): the same facts, without JSON's cost."""
    return f"{name}\0{t.dtype}\0{tuple(t.shape)}\n".encode()


def _state_items(module_or_state_dict: torch.nn.Module | Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    if isinstance(module_or_state_dict, torch.nn.Module):
        return module_or_state_dict.state_dict()
    return module_or_state_dict


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(_tensor_bytes(t)).hexdigest()


def tensor_digests(module_or_state_dict: torch.nn.Module | Mapping[str, torch.Tensor]) -> dict[str, str]:
    """Per-tensor SHA-256 of the bytes of every entry of a state dict (hashed in parallel threads)."""
    items = _state_items(module_or_state_dict)
    names = sorted(items)
    workers = max(1, min(4, os.cpu_count() or 1))
    if workers == 1 or len(names) < 2:
        return {n: _digest(items[n]) for n in names}
    from concurrent.futures import ThreadPoolExecutor

    # hashlib releases the GIL on large buffers, so threads give a real speed-up.
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return dict(zip(names, pool.map(lambda n: _digest(items[n]), names)))


def fingerprint_from_digests(items: Mapping[str, torch.Tensor], digests: Mapping[str, str]) -> str:
    """Combine per-tensor digests with names, dtypes and shapes into one fingerprint."""
    h = hashlib.sha256(b"steadyclip-state-v1\n")
    for name in sorted(items):
        h.update(_header(name, items[name]))
        h.update(digests[name].encode() + b"\n")
    return h.hexdigest()


def state_fingerprint(module_or_state_dict: torch.nn.Module | Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over sorted (name, dtype, shape, bytes) of a model's state.

    For a module this is its ``state_dict()``: every parameter and persistent
    buffer, i.e. exactly what a checkpoint defines (non-persistent buffers are
    derived from the config, which ``config_hash`` covers; ``buffers_fingerprint``
    watches them in memory). It does not depend on the file format: a ``.pt``
    and a ``.safetensors`` of the same weights agree. Each tensor's bytes are
    hashed separately (in parallel) and the digests combined, so a difference
    can be traced to a tensor (``tensor_digests``).
    """
    items = _state_items(module_or_state_dict)
    return fingerprint_from_digests(items, tensor_digests(items))


_SAMPLE_PER_PARAM = 64  # elements sampled per parameter: evenly strided, plus the last one


def _sample(flat: torch.Tensor) -> list[torch.Tensor]:
    step = max(1, flat.numel() // _SAMPLE_PER_PARAM)
    return [flat[::step][:_SAMPLE_PER_PARAM], flat[-1:]]  # views: no copy until the cat


def param_sample_fingerprint(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    """Hash of a fixed sample of each tensor's elements (cheap; catches broad changes only)."""
    h = hashlib.sha256(b"steadyclip-sample-v1\n")
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for name, t in sorted(named, key=lambda kv: kv[0]):
        h.update(_memory_header(name, t))
        if t.numel():
            by_dtype.setdefault(t.dtype, []).extend(_sample(t.detach().reshape(-1)))
    for dtype in sorted(by_dtype, key=str):
        h.update(_tensor_bytes(torch.cat(by_dtype[dtype])))
    return h.hexdigest()


def buffers_fingerprint(module: torch.nn.Module) -> str:
    """The cheap in-memory tamper check: cost ~ size of the buffers, not of the weights.

    Covers every buffer in full (BatchNorm running stats and counters, masks, ...),
    a fixed sample of every parameter's elements, and each parameter's storage
    address and in-place version counter: any ``param.add_()``/``copy_()``, even
    under ``no_grad``, bumps the counter; swapping a parameter changes the address.
    (Writes through ``param.data`` bypass the counter; the sample sees broad ones
    and ``LoadedModel.verify_full`` sees all.) About 7 ms for ViT-B-32 on one core.
    """
    h = hashlib.sha256(b"steadyclip-buffers-v1\n")
    for name, b in sorted(module.named_buffers(remove_duplicate=False), key=lambda kv: kv[0]):
        h.update(_memory_header(name, b))
        h.update(_tensor_bytes(b))
    params = list(module.named_parameters(remove_duplicate=False))
    h.update(param_sample_fingerprint(params).encode())
    h.update("".join(f"{name}:{p.data_ptr()}:{p._version}\n" for name, p in sorted(params, key=lambda kv: kv[0]))
             .encode())
    return h.hexdigest()


# --- expected hashes: one parsing and one matching rule for every check --------------


def parse_sha256(expected: str) -> str:
    """``expected`` as a SHA-256 to check against: lower-case hex, the full digest or a prefix of >= 8 digits.

    Raises:
        InputError: anything else (user input: a lock, ``--sha256``, ``expected_sha256=``).
    """
    value = expected.strip().lower() if isinstance(expected, str) else ""
    if len(value) < 8 or len(value) > 64 or any(c not in "0123456789abcdef" for c in value):
        raise InputError(f"an expected SHA-256 must be 8 to 64 hex digits, got {expected!r}")
    return value


def sha256_matches(actual: str, expected: str) -> bool:
    """Whether the full hex digest ``actual`` is ``expected`` (see :func:`parse_sha256`) or starts with it."""
    return actual.lower().startswith(parse_sha256(expected))
