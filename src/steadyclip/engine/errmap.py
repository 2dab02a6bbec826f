"""Foreign and remote errors become steadyclip errors here, and only here (httpx's ``map_exceptions``).

Three kinds come in:

- **What Pillow and the OS raise while decoding** (``OSError``, ``SyntaxError``, a decompression
  bomb, ...): :func:`decoding` turns them into :class:`~steadyclip.errors.ImageDecodeError` or
  :class:`~steadyclip.errors.ImageTooLargeError`, naming the image and what to do.
- **An error that crossed a process boundary as its class name and message** (an engine
  replica's error that does not survive pickling, an outcome row's ``error_type``/``error_message``):
  :func:`rebuild` makes the same class of ours again.
- **What a replica or a Ray actor sent back**: :func:`from_replica` (the exception, or its name and
  message) and :func:`from_ray` (the steadyclip error inside Ray's wrapper, which may keep only
  its traceback text).

:func:`describe` is the way out: the ``(class name, message)`` a row records.
"""
from __future__ import annotations

import contextlib
import re
import struct
from collections.abc import Iterator
from typing import Any

from steadyclip import errors
from steadyclip.errors import (
    ImageDecodeError,
    ImageError,
    ImageTooLargeError,
    SteadyClipError,
)

__all__ = ["DECODE_ERRORS", "UNEXPECTED_NOTE", "decoding", "describe", "from_ray", "from_replica", "rebuild"]

# What Pillow's decoders are seen raising on corrupt or hostile files. Warnings are
# here because a process running with warnings-as-errors gets them raised.
DECODE_ERRORS: tuple[type[BaseException], ...] = (
    OSError, SyntaxError, ValueError, TypeError, struct.error, EOFError, IndexError, KeyError,
    ZeroDivisionError, OverflowError, MemoryError, NotImplementedError, RuntimeError, AssertionError,
    Warning,
)

#: Appended to the message of an error no decoder should raise, when it is kept as a row.
UNEXPECTED_NOTE = " (unexpected; please report)"

_RAY_TEXT = re.compile(r"steadyclip\.errors\.(\w+): (.+)")


@contextlib.contextmanager
def decoding(name: str, cap: int) -> Iterator[None]:
    """Inside: Pillow's and the OS's errors about image ``name`` become our typed image errors.

    Args:
        name: how messages name the image (a path, ``<bytes len=...>``).
        cap: the pixel cap in force, quoted when Pillow's own bomb check refuses the image.
    """
    from PIL import Image

    try:
        yield
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise _too_large_pillow(name, cap, e) from e
    except DECODE_ERRORS as e:
        raise _decode_error(name, e) from e


def describe(e: BaseException, *, unexpected: bool = False) -> tuple[str, str]:
    """``(class name, message)`` of ``e`` as a row records it; ``unexpected`` marks a bug to report."""
    return type(e).__name__, f"{e}{UNEXPECTED_NOTE}" if unexpected else str(e)


def rebuild(name: str, message: str, *, origin: str = "another process", note_origin: bool = False
            ) -> SteadyClipError:
    """The steadyclip error called ``name`` with ``message``, as sent from ``origin``.

    A class of ours that takes a message is built again (``note_origin`` adds "(raised in
    <origin>)" to its message); any other name becomes a :class:`SteadyClipError` that keeps
    the name, the message and the origin.
    """
    cls = getattr(errors, name, None)
    if isinstance(cls, type) and issubclass(cls, SteadyClipError):
        try:
            built: SteadyClipError = cls(f"{message} (raised in {origin})" if note_origin else message)
            return built
        except TypeError:  # e.g. LockMismatchError: keyword fields the text alone cannot give back
            pass
    return SteadyClipError(f"{name}: {message} (raised in {origin})")


def from_replica(value: Any) -> BaseException:
    """An error an engine replica sent back: the exception itself, or its ``(class name, message)``."""
    if isinstance(value, BaseException):
        return value
    name, message = value
    return rebuild(str(name), str(message), origin="an engine replica")


def from_ray(e: BaseException) -> SteadyClipError | None:
    """The steadyclip error a Ray actor raised, recovered from Ray's wrapper; ``None`` if there is none.

    Ray keeps the original exception as ``cause`` when it can; else only the traceback text is
    left, and the last ``steadyclip.errors.Name: message`` line in it is rebuilt.
    """
    seen: BaseException | None = e
    while seen is not None:
        cause = getattr(seen, "cause", None)
        if isinstance(cause, SteadyClipError):
            return cause
        seen = seen.__cause__ or seen.__context__
    found = _RAY_TEXT.findall(str(e))
    if not found:
        return None
    name, message = found[-1]
    err = rebuild(name, message, origin="a Ray actor", note_origin=True)
    return err if type(err).__name__ == name else None  # a class the text cannot rebuild: Ray's own error


def _decode_error(name: str, e: BaseException) -> ImageDecodeError:
    detail = str(e) or type(e).__name__
    if isinstance(e, MemoryError):
        detail = "ran out of memory while decoding"
    return ImageDecodeError(
        f"{name} could not be decoded ({type(e).__name__}: {detail}); the file is corrupt, truncated or "
        "not an image: re-download or re-export it"
    )


def _too_large_pillow(name: str, cap: int, e: BaseException) -> ImageTooLargeError:
    from PIL import Image

    limit = Image.MAX_IMAGE_PIXELS
    return ImageTooLargeError(
        f"{name} was refused by Pillow's decompression-bomb check ({e}); steadyclip's cap is {cap:,} pixels "
        f"and Pillow's is {limit if limit is None else f'{limit:,}'} (errors above twice that). To accept such "
        "images you must raise both: max_pixels and PIL.Image.MAX_IMAGE_PIXELS"
    )
