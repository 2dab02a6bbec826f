"""Per-item work outside the model: read the bytes, hash them, decode, preprocess.

Runs in decoder worker processes (local backend), engine replicas and Ray actors; a bad
file becomes an error :class:`~steadyclip.engine.outcome.ImageOutcome` here, it never raises.
Decoding is the engine's own (:func:`~steadyclip.engine.outcome.decode_input`). The transform is the
engine's own (``LoadedModel.preprocess``, pickled), so a worker produces the
exact tensor ``Engine.preprocess`` would.
"""
from __future__ import annotations

import hashlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from steadyclip.batch.inputs import InputItem
from steadyclip.engine.outcome import ImageOutcome, decode_input, unexpected_failure
from steadyclip.errors import (
    ImageDecodeError,
    ImageError,
    ImageSourceError,
    ImageTooLargeError,
)

_logger = logging.getLogger(__name__)

DEFAULT_MAX_FILE_BYTES = 512 * 1024 * 1024

Transform = Callable[[Any], Any]


# An input before the model: its outcome so far, and its pixels (3, H, W) float32 where it decoded.
Prepared = tuple[ImageOutcome, np.ndarray | None]


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


def prepare(item: InputItem, transform: Transform, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES) -> Prepared:
    """Read, hash, decode and preprocess one input; a failure is an error outcome, never raised."""
    try:
        data = read_bytes(item.location, max_file_bytes)
    except ImageError as e:
        return ImageOutcome.failed(item.index, item.path, e), None
    except Exception as e:  # noqa: BLE001 - a reader bug must not abort the job: record it with its real type
        return unexpected_failure(item.index, item.path, e), None
    if not data:
        empty = ImageDecodeError(f"{item.location} is empty (0 bytes); re-export or remove it")
        return ImageOutcome.failed(item.index, item.path, empty, sha256=hashlib.sha256(data).hexdigest()), None
    # sha256 of exactly the bytes decoded; a decoder bug becomes a row too, with its real type
    outcome, pixels = decode_input(item.index, data, transform, source=item.path, name=item.location, sha256=True,
                                   unexpected="row")
    return outcome, None if pixels is None else pixels.numpy()


def pixel_batch(pixels: Sequence[np.ndarray]) -> Any:
    """Pixels (3, H, W) of several inputs as one tensor (N, 3, H, W), in order."""
    import torch

    return torch.from_numpy(np.stack(pixels))


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
