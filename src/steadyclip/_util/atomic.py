"""The one atomic, durable file write: a temp file in the same folder, fsync, rename, fsync the folder.

A reader sees either the old file or the complete new one, never a torn write; after
:func:`atomic_path` returns, the new file survives a power cut too (the folder's entry is
on disk). Every file steadyclip replaces (lockfiles, caches, converted weights, batch parts
and outputs) is written through here.

The temp file is named ``.<name>.tmp-<pid>-<random>`` (hidden, unique per writer) and is
created with the permissions a plain ``open(path, "w")`` would give (the umask applies).
"""
from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_path", "fsync_dir", "write_atomic"]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A fresh temp path next to ``path``; write it inside the block, and it replaces ``path`` on exit.

    On a clean exit the temp file is fsynced, renamed over ``path`` and the folder fsynced.
    On an error inside the block (or while committing) the temp file is removed and the
    error propagates; ``path`` is untouched.

    Example::

        with atomic_path("out.parquet") as tmp:
            pq.write_table(table, tmp)

    Raises:
        OSError: the folder is missing or not writable, the disk is full, ...
    """
    final = Path(path)
    tmp = _reserve(final)
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(final.parent)


def write_atomic(path: str | os.PathLike[str], data: bytes | str, *, encoding: str = "utf-8") -> None:
    """Replace ``path`` with ``data`` (``str`` is encoded with ``encoding``) atomically and durably."""
    raw = data.encode(encoding) if isinstance(data, str) else data
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(raw)


def fsync_dir(folder: str | os.PathLike[str]) -> None:
    """Flush a folder's entries (a rename in it) to disk; a no-op where folders cannot be opened (Windows)."""
    if os.name == "nt":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _reserve(final: Path) -> Path:
    """Create an empty, uniquely named temp file beside ``final`` (O_EXCL: two writers never share one)."""
    while True:
        tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return tmp


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
