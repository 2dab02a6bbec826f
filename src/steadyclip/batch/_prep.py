"""Per-item work outside the model: read the bytes, hash them, decode, preprocess.

Runs in decoder worker processes (local backend) and inside Ray actors; a bad
file becomes an error result here, it never raises. The transform is the
engine's own (``LoadedModel.preprocess``, pickled), so a worker produces the
exact tensor ``Engine.preprocess`` would.
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from steadyclip.batch.inputs import InputItem
from steadyclip.errors import (
    ImageDecodeError,
    ImageError,
    ImageSourceError,
    ImageTooLargeError,
)

_logger = logging.getLogger(__name__)

DEFAULT_MAX_FILE_BYTES = 512 * 1024 * 1024

Transform = Callable[[Any], Any]


@dataclass(frozen=True, slots=True)
class Prepared:
    """One input after decoding: pixels (3, H, W) float32 on success, else the error."""

    index: int
    path: str
    sha256: str | None
    pixels: np.ndarray | None
    error_type: str | None = None
    error_message: str | None = None


@dataclass(frozen=True, slots=True)
class ItemResult:
    """One input after the model: its embedding (D,) float32 on success, else the error."""

    index: int
    path: str
    sha256: str | None
    embedding: np.ndarray | None
    error_type: str | None = None
    error_message: str | None = None

    @property
    def ok(self) -> bool:
        return self.error_type is None


def read_bytes(location: str, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES) -> bytes:
    """The file's bytes, or an ImageError that says why not."""
    if not location:
        raise ImageSourceError("empty path in the input list; give a file path")
    try:
        size = os.stat(location).st_size
        if size > max_file_bytes:
            raise ImageTooLargeError(
                f"{location} is {size} bytes, over the {max_file_bytes}-byte file cap; "
                "raise max_file_bytes if it really is an image"
            )
        with open(location, "rb") as f:
            return f.read()
    except FileNotFoundError as e:
        raise ImageSourceError(f"{location} does not exist (moved or deleted after listing?)") from e
    except IsADirectoryError as e:
        raise ImageSourceError(f"{location} is a directory, not an image file") from e
    except OSError as e:
        raise ImageSourceError(f"cannot read {location}: {e.strerror or e}") from e


class _NamedBytes(io.BytesIO):
    """In-memory file bytes that keep the file's name, so decode errors say which file."""

    def __init__(self, data: bytes, name: str) -> None:
        super().__init__(data)
        self.name = name


def prepare(item: InputItem, transform: Transform, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES) -> Prepared:
    """Read, hash, decode and preprocess one input; failures become an error ``Prepared``."""
    from steadyclip.engine.images import load_image

    sha: str | None = None
    try:
        data = read_bytes(item.location, max_file_bytes)
        sha = hashlib.sha256(data).hexdigest()  # of exactly the bytes decoded below
        if not data:
            raise ImageDecodeError(f"{item.location} is empty (0 bytes); re-export or remove it")
        pixels = transform(load_image(_NamedBytes(data, item.location)))
        return Prepared(item.index, item.path, sha, pixels.numpy())
    except ImageError as e:
        return Prepared(item.index, item.path, sha, None, type(e).__name__, str(e))
    except Exception as e:  # noqa: BLE001 - a decoder bug must not abort the job: record it with its real type
        _logger.warning("unexpected %s while preparing %s: %s", type(e).__name__, item.path, e)
        return Prepared(item.index, item.path, sha, None, type(e).__name__, f"{e} (unexpected; please report)")


def pixel_batch(prepared: Sequence[Prepared]) -> Any:
    """The successful items' pixels as one tensor (N, 3, H, W), in order."""
    import torch

    return torch.from_numpy(np.stack([p.pixels for p in prepared if p.pixels is not None]))


# ---- decoder worker processes ----------------------------------------------------------
_STATE: dict[str, Any] = {}


def init_worker(transform: Transform, max_file_bytes: int, parent_pid: int) -> None:
    """Initialise a decoder process: one torch thread, no SIGINT, exit when the parent dies."""
    import torch

    # Several decoders share the CPU with the model; a forked child must not enter OpenMP.
    torch.set_num_threads(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    _STATE["transform"] = transform
    _STATE["max_file_bytes"] = max_file_bytes
    threading.Thread(target=_exit_with_parent, args=(parent_pid,), daemon=True).start()


def _exit_with_parent(parent_pid: int) -> None:
    # After the parent is SIGKILLed nobody would ever shut this pool down.
    while os.getppid() == parent_pid:
        time.sleep(0.5)
    os._exit(0)


def prepare_chunk(items: Sequence[InputItem]) -> list[Prepared]:
    """Prepare a chunk of items in a decoder process (after :func:`init_worker`)."""
    transform, cap = _STATE["transform"], _STATE["max_file_bytes"]
    return [prepare(item, transform, cap) for item in items]
