"""Catch what image decoders print, so it becomes data on the result instead of terminal noise.

Three channels:

- **Python warnings** (Pillow's ``UserWarning`` about corrupt metadata, ...). Inside
  :func:`captured` every warning raised *by the capturing thread* is recorded
  whatever the process's warnings filter says, so a result never depends on
  ``-W error`` or on which warnings were already shown once. Pillow's
  ``DecompressionBombWarning`` is the exception: it stays an error, because
  it means "refuse this image".
- **Pillow's log records** (``logger.error(...)`` in ``PIL.TiffImagePlugin``, ...): records of
  WARNING and above that the capturing thread logs under ``PIL`` are recorded, and not passed
  on to the process's handlers (so nothing is printed), whatever the logging configuration.
- **C-level stderr** (libtiff's default handlers write straight to file
  descriptor 2). With ``fd_stderr=True`` fd 2 is pointed at a temporary file for
  the duration; each line written becomes a warning.

All channels are process-global, so captures are serialised by one lock. While
one runs, warnings raised by *other* threads are shown normally (to the saved
``showwarning``), but they see the "always" filter; their ``PIL`` records of WARNING and
above go to the root logger's handlers as usual (lower ones are dropped); and anything another thread
writes to fd 2 during an fd capture (milliseconds, TIFF decodes only) is
attributed to the image being decoded. The batch runner decodes in separate
processes, so neither affects it.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import threading
import warnings
from collections.abc import Iterator
from typing import TextIO

from PIL import Image

from steadyclip._util.forksafe import ForkSafeRLock

_logger = logging.getLogger(__name__)

_LOCK = ForkSafeRLock()  # an engine replica forked while a thread held it gets it unheld
_MAX_CHARS = 500  # one warning's text; a decoder can print a whole tag dump


def _clip(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _MAX_CHARS else text[: _MAX_CHARS - 3] + "..."


@contextlib.contextmanager
def captured(sink: list[str], *, fd_stderr: bool = False) -> Iterator[None]:
    """Record the current thread's warnings (and, optionally, fd-2 output) into ``sink``.

    Args:
        sink: list the messages are appended to, in order, as ``"Category: text"``.
        fd_stderr: also capture what C code writes to file descriptor 2.
    """
    owner = threading.get_ident()
    with _LOCK, warnings.catch_warnings():
        original = warnings.showwarning
        warnings.simplefilter("always")
        warnings.simplefilter("error", Image.DecompressionBombWarning)

        def show(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                 file: TextIO | None = None, line: str | None = None) -> None:
            if threading.get_ident() != owner:
                original(message, category, filename, lineno, file, line)
                return
            sink.append(_clip(f"{category.__name__}: {message}"))

        warnings.showwarning = show
        with _pil_logs_into(sink, owner):
            if not fd_stderr:
                yield
                return
            with _fd2_into(sink):
                yield


class _PilRecords(logging.Handler):
    """The capturing thread's ``PIL`` records into the sink; other threads' on to the root handlers."""

    def __init__(self, sink: list[str], owner: int, propagate: bool) -> None:
        super().__init__(logging.WARNING)
        self.sink, self.owner, self.propagate = sink, owner, propagate

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.owner:
            self.sink.append(_clip(f"{record.levelname} {record.name}: {record.getMessage()}"))
        elif self.propagate:
            logging.getLogger().handle(record)


@contextlib.contextmanager
def _pil_logs_into(sink: list[str], owner: int) -> Iterator[None]:
    pil = logging.getLogger("PIL")
    saved = pil.level, pil.propagate
    handler = _PilRecords(sink, owner, pil.propagate)
    pil.addHandler(handler)
    pil.setLevel(logging.WARNING)  # recorded whatever level the process's logging is at
    pil.propagate = False  # the capturing thread's records are data, not terminal output
    try:
        yield
    finally:
        pil.removeHandler(handler)
        pil.setLevel(saved[0])
        pil.propagate = saved[1]


@contextlib.contextmanager
def _fd2_into(sink: list[str]) -> Iterator[None]:
    try:
        saved = os.dup(2)
    except OSError:  # no fd 2 (a daemon with it closed): nothing can be printed there anyway
        yield
        return
    try:
        with tempfile.TemporaryFile() as tmp:
            _flush_stderr()
            os.dup2(tmp.fileno(), 2)
            try:
                yield
            finally:
                _flush_stderr()
                os.dup2(saved, 2)
            tmp.seek(0)
            text = tmp.read().decode("utf-8", errors="replace")
    finally:
        os.close(saved)
    sink.extend(_clip(f"stderr: {ln}") for ln in text.splitlines() if ln.strip())


def _flush_stderr() -> None:
    with contextlib.suppress(Exception):
        sys.stderr.flush()


__all__ = ["captured"]
