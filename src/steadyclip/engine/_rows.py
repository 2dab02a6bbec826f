"""Many inputs in, one row per input out: bad images become failure rows, never a lost batch.

The CLI, the server and Python callers all get the same rows from here
(``Engine.classify(..., on_error="row")``); more than one micro-batch of inputs is
decoded and embedded in the engine's replicas, one chunk per task.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch

from steadyclip._util.futures import joined_lists, relay
from steadyclip.errors import ImageError, ReplicaCrashError
from steadyclip.results import ImageFailure

if TYPE_CHECKING:
    from steadyclip.engine._core import ForwardCore
    from steadyclip.engine._replicas import ReplicaSet
    from steadyclip.engine.images import ImageInput

__all__ = ["UploadRow", "as_list", "decode_and_embed", "embed_in_place", "embed_rows", "embed_uploads", "source_name"]

Row = Any  # np.ndarray (D,) float32 | ImageFailure


def as_list(images: Sequence[ImageInput] | ImageInput) -> list[ImageInput]:
    """One image (path, bytes, PIL) or a sequence of them -> a list."""
    if isinstance(images, (str, bytes, bytearray)) or not isinstance(images, Sequence):
        return [images]
    return [cast("ImageInput", im) for im in images]


def source_name(image: Any) -> str | None:
    """A path-like input's name for its row; ``None`` for bytes and PIL images."""
    return os.fspath(image) if isinstance(image, (str, os.PathLike)) else None


def embed_in_place(core: ForwardCore, pixels: Sequence[torch.Tensor | None]) -> list[np.ndarray | None]:
    """L2-normalised embeddings of the decoded entries, one forward at the fixed shapes; ``None``
    (an input that failed to decode) stays ``None``, in place. Every many-inputs path ends here."""
    good = [p for p in pixels if p is not None]
    if not good:
        return [None] * len(pixels)
    vectors = iter(core.embed_local("image", torch.stack(good)))  # (N, D)
    return [next(vectors) if p is not None else None for p in pixels]


def decode_and_embed(core: ForwardCore, images: Sequence[ImageInput]) -> list[np.ndarray | ImageError]:
    """Decode each input (an error is kept, in place), embed the good ones at the fixed shapes."""
    pixels: list[torch.Tensor | None] = []
    errors: list[ImageError | None] = []
    for im in images:
        try:
            pixels.append(core.preprocess(im))
            errors.append(None)
        except ImageError as e:
            pixels.append(None)
            errors.append(e)
    vectors = embed_in_place(core, pixels)  # an entry is None exactly where its error is not
    return [e if e is not None else cast(np.ndarray, v) for v, e in zip(vectors, errors)]


def embed_rows(replicas: ReplicaSet, images: Sequence[ImageInput]) -> list[Row]:
    """One row per input: its L2-normalised embedding, or an :class:`ImageFailure`."""
    core = replicas.core
    size = core.size("image")
    if replicas.use_for(len(images)):
        futures = [replicas.submit(decode_and_embed, list(images[s : s + size]))
                   for s in range(0, len(images), size)]
        results = [r for f in futures for r in f.result()]
    else:
        core.check_state()
        results = decode_and_embed(core, images)
    return [ImageFailure(i, source_name(images[i]), type(r).__name__, str(r)) if isinstance(r, ImageError) else r
            for i, r in enumerate(results)]


def raise_first(rows: Sequence[Row], images: Sequence[ImageInput]) -> None:
    """``on_error="raise"``: the first failure, as the typed error the decoder raised."""
    from steadyclip import errors

    for r in rows:
        if isinstance(r, ImageFailure):
            cls = getattr(errors, r.error_type, errors.ImageError)
            raise cls(r.message)


@dataclass(frozen=True)
class UploadRow:
    """One uploaded image's outcome: its embedding, or the error that refused it; its decoders' warnings."""

    embedding: np.ndarray | None  # (D,) L2-normalised float32
    warnings: tuple[str, ...] = ()
    error: tuple[str, str] | None = None  # (error class name, message): rebuilt by the caller


def embed_uploads(replicas: ReplicaSet, datas: Sequence[bytes], max_pixels: int | None) -> Future[list[UploadRow]]:
    """Decode, preprocess and embed uploaded image bytes in the replicas, one micro-batch per task.

    The server uses this on every core: decoding runs beside the model in each replica
    (decoders' warnings are captured per process, so replicas decode in parallel).
    """
    size = replicas.core.size("image")
    return joined_lists([_isolated(replicas, list(datas[s : s + size]), max_pixels)
                         for s in range(0, len(datas), size)])


def _isolated(replicas: ReplicaSet, chunk: list[bytes], max_pixels: int | None) -> Future[list[UploadRow]]:
    """A chunk's rows; a chunk that kills replicas twice is retried upload by upload, so only the
    culprit (a crashing codec, memory exhausted) fails, not the requests batched with it."""
    out: Future[list[UploadRow]] = Future()

    def done(f: Future[list[UploadRow]]) -> None:
        err = f.exception()
        try:
            if err is None:
                out.set_result(f.result())
            elif not isinstance(err, ReplicaCrashError):
                out.set_exception(err)
            elif len(chunk) == 1:
                out.set_result([UploadRow(None, (), ("ImageDecodeError", CRASH_MESSAGE))])
            else:
                relay(joined_lists([_isolated(replicas, [d], max_pixels) for d in chunk]), out)
        except BaseException as e:  # noqa: BLE001 - e.g. the pool closed meanwhile: the waiter hears it
            if not out.done():
                out.set_exception(e)

    replicas.submit(decode_uploads, chunk, max_pixels).add_done_callback(done)
    return out


CRASH_MESSAGE = ("decoding this image killed the engine replica twice; it likely crashes the image library or "
                 "exhausts memory - re-export it as PNG or JPEG")


def decode_uploads(core: ForwardCore, datas: list[bytes], max_pixels: int | None) -> list[UploadRow]:
    """In a replica: each upload decoded (a bad one is an error row, in place), the good ones embedded."""
    from steadyclip.engine.images import decode_image

    pixels: list[torch.Tensor | None] = []
    notes: list[tuple[tuple[str, ...], tuple[str, str] | None]] = []  # (warnings, error) per upload
    for data in datas:
        try:
            decoded = decode_image(data, max_pixels=max_pixels)
            pixels.append(core.preprocess(decoded.image))
            notes.append((decoded.warnings, None))
        except ImageError as e:
            pixels.append(None)
            notes.append(((), (type(e).__name__, str(e))))
    return [UploadRow(v, warned, err) for v, (warned, err) in zip(embed_in_place(core, pixels), notes)]
