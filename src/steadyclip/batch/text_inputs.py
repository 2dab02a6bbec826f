"""What a text job reads: a text file (one text per line) or a column of a CSV/Parquet, in order.

Every line (or cell) is one input and gets one row, so row ``i`` of the output is line ``i + 1``
of the file (or data row ``i`` of the table) - a caption set or a query log joins back by position.
A text is embedded exactly as written: only the line ending (``\\n``, ``\\r\\n``) and a UTF-8 byte-order
mark at the start of the file are removed; ``#`` is text, not a comment. A line or cell that cannot be
embedded is not skipped but becomes an error row (:class:`~steadyclip.errors.TextInputError`):

- blank (empty or only whitespace): there is nothing to embed;
- not valid UTF-8: the row's ``text`` shows the bytes as ``\\xNN`` escapes;
- a missing cell (a Parquet null, a CSV row too short).

The listing's hash (the job's identity on resume) covers every text's bytes in order.
"""
from __future__ import annotations

import csv
import hashlib
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from steadyclip.batch.inputs import MANIFEST_SUFFIXES
from steadyclip.errors import BatchJobError

_logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_TEXT_COLUMN", "TextItem", "TextListingHasher", "TextSource", "open_texts"]

DEFAULT_TEXT_COLUMN = "text"
_CHUNK = 8192
_BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True, slots=True)
class TextItem:
    """One text of a job.

    Attributes:
        index: position in the file (0-based line or data row); the row key of the output.
        text: the text as read (``None`` for a missing cell; ``\\xNN`` escapes where not UTF-8).
        sha256: SHA-256 of the text's bytes as read (``None`` for a missing cell).
        error: why it cannot be embedded, or ``None`` when it can.
    """

    index: int
    text: str | None
    sha256: str | None
    error: str | None = None


class TextSource:
    """A re-iterable, ordered listing of a text job's inputs. Use :func:`open_texts` to make one."""

    def __init__(self, path: Path, kind: str, column: str | None, description: str) -> None:
        self.path = path
        self.kind = kind  # "lines", "csv" or "parquet"
        self.column = column
        self.description = description

    def __repr__(self) -> str:
        col = f", column {self.column!r}" if self.column else ""
        return f"TextSource({self.kind}: {self.description}{col})"

    def __iter__(self) -> Iterator[TextItem]:
        if self.kind == "lines":
            values: Iterable[bytes | str | None] = _lines(self.path)
        elif self.kind == "csv":
            values = _csv_cells(self.path, str(self.column))
        else:
            values = _parquet_cells(self.path, str(self.column))
        where = "line" if self.kind == "lines" else "data row"
        for i, value in enumerate(values):
            yield _item(i, value, f"{where} {i + 1}")

    def fingerprint(self) -> tuple[str, int]:
        """SHA-256 over the ordered texts' bytes, and how many there are (one streaming pass)."""
        hasher = TextListingHasher()
        for _ in hasher.watch(self):
            pass
        return hasher.digest()


class TextListingHasher:
    """Hashes a text listing while it streams by (a job hashes it again as it runs, to prove it did not change)."""

    def __init__(self) -> None:
        self._h = hashlib.sha256(b"steadyclip-texts-v1\0")
        self._n = 0

    def watch(self, source: Iterable[TextItem]) -> Iterator[TextItem]:
        for item in source:
            self._h.update((item.sha256 or "-").encode() + b"\0")
            self._n += 1
            yield item

    def digest(self) -> tuple[str, int]:
        return self._h.hexdigest(), self._n


def open_texts(spec: str | os.PathLike[str], *, column: str | None = None) -> TextSource:
    """A text file (one text per line, any suffix) or a CSV/Parquet's ``column`` (default ``"text"``).

    Raises:
        BatchJobError: the file does not exist or is a folder; ``column`` given for a plain text file;
            a CSV/Parquet without that column.

    Example:
        >>> [item.text for item in open_texts("captions.txt")][:2]
        ['a red circle', 'two blue squares']
    """
    text = os.fspath(spec)
    path = Path(text).expanduser()
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise BatchJobError(f"text input {text!r} {what}; give a text file with one text per line, or a "
                            "CSV/Parquet file and the column holding the texts (--text-column)")
    table_kind = MANIFEST_SUFFIXES.get(path.suffix.lower())
    if table_kind not in ("csv", "parquet"):
        if column is not None:
            raise BatchJobError(f"{text!r} is read as plain text, one text per line: it has no columns, so "
                                f"--text-column {column!r} does not apply; give a .csv or .parquet file, or drop it")
        return TextSource(path, "lines", None, text)
    column = DEFAULT_TEXT_COLUMN if column is None else column
    columns = _csv_header(path) if table_kind == "csv" else _parquet_columns(path, column)
    if column not in columns:
        raise BatchJobError(
            f"{text!r} has no column {column!r} (columns: {columns[:10]}); name the column holding the texts "
            "with --text-column (text_column=)"
        )
    return TextSource(path, table_kind, column, text)


def _item(index: int, value: bytes | str | None, where: str) -> TextItem:
    """One line or cell as an item: its text, its bytes' hash, and why it cannot be embedded (if so)."""
    if value is None:
        return TextItem(index, None, None, f"{where} has no value (a missing cell); fill it or remove the row")
    if isinstance(value, str):
        # surrogateescape: a CSV cell read that way gives back its original bytes (not UTF-8 -> error row)
        value = value.encode("utf-8", "surrogateescape")
    sha = hashlib.sha256(value).hexdigest()
    try:
        decoded = value.decode("utf-8")
    except UnicodeDecodeError as e:
        shown = value.decode("utf-8", "backslashreplace")
        return TextItem(index, shown, sha, f"{where} is not valid UTF-8 (byte 0x{value[e.start]:02x} at "
                                           f"offset {e.start}); re-encode the file as UTF-8")
    if not decoded.strip():
        return TextItem(index, decoded, sha, f"{where} is blank, there is nothing to embed; blank lines are "
                                             "error rows so that row i stays line i+1 - remove them to drop the rows")
    return TextItem(index, decoded, sha)


def _lines(path: Path) -> Iterator[bytes]:
    try:
        with open(path, "rb") as f:
            for n, raw in enumerate(f):
                if n == 0 and raw.startswith(_BOM):
                    raw = raw[len(_BOM):]
                yield raw.removesuffix(b"\n").removesuffix(b"\r")
    except OSError as e:
        raise BatchJobError(f"cannot read text file {str(path)!r}: {e.strerror or e}") from e


def _csv_header(path: Path) -> list[str]:
    try:
        with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
            return next(csv.reader(f), [])
    except (OSError, csv.Error) as e:
        raise BatchJobError(f"cannot read CSV {str(path)!r}: {e}") from e


def _csv_cells(path: Path, column: str) -> Iterator[str | None]:
    # surrogateescape: a cell that is not UTF-8 becomes that one row's error, not the whole job's
    try:
        with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
            for row in csv.DictReader(f):
                yield row.get(column)
    except (OSError, csv.Error) as e:
        raise BatchJobError(f"cannot read CSV {str(path)!r}: {e}") from e


def _parquet_columns(path: Path, column: str) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.ParquetFile(path).schema_arrow
    except Exception as e:  # pyarrow raises several types for a broken file
        raise BatchJobError(f"cannot read Parquet file {str(path)!r}: {e}") from e
    if column in schema.names:
        kind = schema.field(column).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_binary(kind)
                or pa.types.is_large_binary(kind)):
            raise BatchJobError(f"column {column!r} of {str(path)!r} holds {kind}, not text; name the column "
                                "holding the texts with --text-column (text_column=)")
    return list(schema.names)


def _parquet_cells(path: Path, column: str) -> Iterator[bytes | str | None]:
    import pyarrow.parquet as pq

    try:
        for batch in pq.ParquetFile(path).iter_batches(columns=[column], batch_size=_CHUNK):
            yield from batch.column(0).to_pylist()
    except Exception as e:  # pyarrow raises several types for a broken file
        raise BatchJobError(f"cannot read Parquet file {str(path)!r}: {e}") from e
