"""What a batch job reads: a folder, a glob, a manifest or a list, as an ordered stream of items.

The order is part of the job's identity (it decides which rows go in which
part file), so it is fixed by the input alone:

- a folder is walked recursively, entries of each directory sorted by name,
  hidden files and folders (``.name``) skipped, only image suffixes kept;
- a glob is expanded and sorted (directories dropped, any suffix kept);
- a manifest (CSV or Parquet with a ``path`` column, or a text file with one
  path per line, ``#`` comments and blank lines skipped) keeps its own order,
  duplicates included; relative paths are read relative to the manifest's folder.

Listings are streamed (a folder one directory at a time, a manifest in chunks),
so a job over millions of files never holds them all - except a glob, which has
to be sorted in memory.
"""
from __future__ import annotations

import csv
import glob
import hashlib
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from steadyclip.errors import BatchJobError

_logger = logging.getLogger(__name__)

__all__ = ["IMAGE_SUFFIXES", "MANIFEST_SUFFIXES", "InputItem", "InputSource", "ListingHasher", "open_inputs"]

IMAGE_SUFFIXES = frozenset({
    ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".gif", ".bmp", ".dib", ".webp", ".tif", ".tiff",
    ".ppm", ".pgm", ".pbm", ".pnm", ".ico", ".avif", ".qoi", ".tga",
})
MANIFEST_SUFFIXES = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet", ".txt": "text", ".lst": "text",
                     ".list": "text"}
_GLOB_CHARS = frozenset("*?[")
_CHUNK = 8192


@dataclass(frozen=True, slots=True)
class InputItem:
    """One input of a job.

    Attributes:
        index: position in the job's order (0-based); the row key of the output.
        path: the path as listed (what the output's ``path`` column shows).
        location: the file to read (``path`` resolved against a manifest's folder).
    """

    index: int
    path: str
    location: str


class InputSource:
    """A re-iterable, ordered listing of a job's inputs (iterate it twice, get the same items).

    Use :func:`open_inputs` to make one.
    """

    def __init__(self, kind: str, description: str, listing: Iterable[tuple[str, str]] | None = None,
                 *, path: Path | None = None) -> None:
        self.kind = kind
        self.description = description
        self._listing = listing
        self._path = path

    def __repr__(self) -> str:
        return f"InputSource({self.kind}: {self.description})"

    def __iter__(self) -> Iterator[InputItem]:
        for i, (shown, location) in enumerate(self._pairs()):
            yield InputItem(i, shown, location)

    def _pairs(self) -> Iterator[tuple[str, str]]:
        if self.kind == "folder":
            assert self._path is not None
            yield from ((p, p) for p in _walk_images(self._path))
        elif self.kind in ("csv", "parquet", "text"):
            assert self._path is not None
            base = self._path.parent
            reader = {"csv": _csv_paths, "parquet": _parquet_paths, "text": _text_paths}[self.kind]
            for p in reader(self._path):
                yield p, _resolve(p, base)
        else:
            assert self._listing is not None
            yield from self._listing

    def fingerprint(self) -> tuple[str, int]:
        """SHA-256 over the ordered listed paths, and how many there are (one streaming pass)."""
        hasher = ListingHasher()
        for _ in hasher.watch(self):
            pass
        return hasher.digest()


class ListingHasher:
    """Hashes a listing while it streams by: a job hashes it again as it runs, to prove it did not change."""

    def __init__(self) -> None:
        self._h = hashlib.sha256(b"steadyclip-inputs-v1\0")
        self._n = 0

    def watch(self, source: Iterable[InputItem]) -> Iterator[InputItem]:
        for item in source:
            self._h.update(item.path.encode("utf-8", "surrogateescape") + b"\0")
            self._n += 1
            yield item

    def digest(self) -> tuple[str, int]:
        return self._h.hexdigest(), self._n


def open_inputs(spec: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> InputSource:
    """Decide what ``spec`` is - folder, glob, manifest or explicit list - and list it lazily.

    Raises:
        BatchJobError: the path does not exist, or is a file that is not a manifest.

    Example:
        >>> [item.path for item in open_inputs("photos/")][:2]
        ['photos/a.jpg', 'photos/b/c.png']
    """
    if not isinstance(spec, (str, os.PathLike)):
        paths = [os.fspath(p) for p in spec]
        return InputSource("list", f"{len(paths)} paths", [(p, p) for p in paths])
    text = os.fspath(spec)
    path = Path(text).expanduser()
    if path.is_dir():
        return InputSource("folder", text, path=path)
    if path.is_file():
        kind = MANIFEST_SUFFIXES.get(path.suffix.lower())
        if kind is None:
            raise BatchJobError(
                f"{text!r} is a file but not a manifest (expected {', '.join(sorted(MANIFEST_SUFFIXES))}); "
                "give a folder, a glob such as 'photos/**/*.jpg', or a CSV/Parquet/text list of paths"
            )
        if kind in ("csv", "parquet"):
            _check_path_column(path, kind)
        return InputSource(kind, text, path=path)
    if _GLOB_CHARS & set(text):
        matches = sorted(m for m in glob.glob(os.path.expanduser(text), recursive=True) if os.path.isfile(m))
        return InputSource("glob", text, [(m, m) for m in matches])
    raise BatchJobError(f"input {text!r} does not exist; give an existing folder, a glob or a manifest file")


def _walk_images(root: Path) -> Iterator[str]:
    """Image files under ``root``, depth first, each directory's entries sorted by name."""
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError as e:
        _logger.warning("cannot list %s (%s); skipped", root, e)
        return
    for entry in entries:
        if entry.name.startswith("."):
            continue
        if entry.is_dir(follow_symlinks=False):
            yield from _walk_images(Path(entry.path))
        elif entry.is_file() and os.path.splitext(entry.name)[1].lower() in IMAGE_SUFFIXES:
            yield entry.path


def _resolve(p: str, base: Path) -> str:
    if not p:
        return p
    q = Path(p).expanduser()
    return str(q if q.is_absolute() else base / q)


def _check_path_column(path: Path, kind: str) -> None:
    columns = _csv_columns(path) if kind == "csv" else _parquet_columns(path)
    if "path" not in columns:
        raise BatchJobError(
            f"manifest {str(path)!r} has no 'path' column (columns: {columns[:10]}); "
            "add a header row with a column named 'path' holding the image paths"
        )


def _csv_columns(path: Path) -> list[str]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            return next(csv.reader(f), [])
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise BatchJobError(f"cannot read manifest {str(path)!r}: {e}") from e


def _parquet_columns(path: Path) -> list[str]:
    import pyarrow.parquet as pq

    try:
        return list(pq.ParquetFile(path).schema_arrow.names)
    except Exception as e:  # pyarrow raises several types for a broken file
        raise BatchJobError(f"cannot read Parquet manifest {str(path)!r}: {e}") from e


def _csv_paths(path: Path) -> Iterator[str]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            for row in csv.DictReader(f):
                yield (row.get("path") or "").strip()
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise BatchJobError(f"cannot read manifest {str(path)!r}: {e}") from e


def _parquet_paths(path: Path) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        for batch in pq.ParquetFile(path).iter_batches(columns=["path"], batch_size=_CHUNK):
            for value in batch.column(0).to_pylist():
                if isinstance(value, bytes):
                    value = value.decode("utf-8", "surrogateescape")
                yield "" if value is None else str(value)
    except Exception as e:  # pyarrow raises several types for a broken file
        raise BatchJobError(f"cannot read Parquet manifest {str(path)!r}: {e}") from e


def _text_paths(path: Path) -> Iterator[str]:
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                s = line.strip()
                if s and not s.startswith("#"):
                    yield s
    except (OSError, UnicodeDecodeError) as e:
        raise BatchJobError(f"cannot read manifest {str(path)!r}: {e}") from e
