"""Many inputs in, one :class:`~steadyclip.engine.outcome.ImageOutcome` per input out: bad images
become failure outcomes, never a lost batch.

The CLI, the server and Python callers all get the same rows from here
(``Engine.classify(..., on_error="row")``, ``Engine.embed_uploads``); more than one micro-batch
of inputs is decoded and embedded in the engine's replicas, one chunk per task.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch

from steadyclip._util.futures import joined_lists, relay
from steadyclip.engine.outcome import ImageOutcome, decode_input
from steadyclip.errors import ReplicaCrashError

if TYPE_CHECKING:
    from steadyclip.engine._core import ForwardCore
    from steadyclip.engine._replicas import ReplicaSet
    from steadyclip.engine.images import ImageInput

__all__ = [
    "CRASH_MESSAGE",
    "as_list",
    "decode_and_embed",
    "embed_decoded",
    "embed_in_place",
    "embed_uploads",
    "embeddings",
    "image_outcomes",
    "raise_first",
    "report_rows",
    "source_name",
]

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


def embed_decoded(core: ForwardCore, decoded: Sequence[tuple[ImageOutcome, torch.Tensor | None]]) -> list[ImageOutcome]:
    """The decoded inputs' outcomes with their embeddings (one forward at the fixed shapes); failures as they are."""
    vectors = embed_in_place(core, [pixels for _, pixels in decoded])
    return [o if v is None else o.embedded(v) for (o, _), v in zip(decoded, vectors)]


def decode_and_embed(core: ForwardCore, images: Sequence[ImageInput], start: int = 0) -> list[ImageOutcome]:
    """Decode each input (a bad one is an error outcome, in place), embed the good ones at the fixed shapes."""
    transform = core.loaded.preprocess
    return embed_decoded(core, [decode_input(start + i, im, transform, source=source_name(im))
                                for i, im in enumerate(images)])


def image_outcomes(replicas: ReplicaSet, images: Sequence[ImageInput]) -> list[ImageOutcome]:
    """One outcome per input, in order; more than one micro-batch of inputs runs in the replicas."""
    core = replicas.core
    size = core.size("image")
    if replicas.use_for(len(images)):
        futures = [replicas.submit(decode_and_embed, list(images[s : s + size]), s)
                   for s in range(0, len(images), size)]
        return [o for f in futures for o in f.result()]
    core.check_state()
    return decode_and_embed(core, images)


def report_rows(outcomes: Sequence[ImageOutcome]) -> tuple[Row, ...]:
    """The rows of an ``EmbedReport``: per input its embedding (D,), or its :class:`ImageFailure`."""
    return tuple(o.embedding if o.ok else o.failure() for o in outcomes)


def embeddings(outcomes: Sequence[ImageOutcome], width: int = 0) -> np.ndarray:
    """The embeddings of outcomes that worked, stacked (N, D); none: an empty (0, width)."""
    vectors = [o.embedding for o in outcomes if o.embedding is not None]
    return np.stack(vectors) if vectors else np.zeros((0, width), dtype=np.float32)


def raise_first(outcomes: Sequence[ImageOutcome]) -> None:
    """``on_error="raise"``: the first failure, as the typed error the decoder raised."""
    for o in outcomes:
        err = o.exception()
        if err is not None:
            raise err


def embed_uploads(replicas: ReplicaSet, datas: Sequence[bytes], max_pixels: int | None) -> Future[list[ImageOutcome]]:
    """Decode, preprocess and embed uploaded image bytes in the replicas, one micro-batch per task.

    The server uses this on every core: decoding runs beside the model in each replica
    (decoders' warnings are captured per process, so replicas decode in parallel).
    """
    size = replicas.core.size("image")
    return joined_lists([_isolated(replicas, list(datas[s : s + size]), max_pixels, s)
                         for s in range(0, len(datas), size)])


def _isolated(replicas: ReplicaSet, chunk: list[bytes], max_pixels: int | None,
              start: int) -> Future[list[ImageOutcome]]:
    """A chunk's rows; a chunk that kills replicas twice is retried upload by upload, so only the
    culprit (a crashing codec, memory exhausted) fails, not the requests batched with it."""
    out: Future[list[ImageOutcome]] = Future()

    def done(f: Future[list[ImageOutcome]]) -> None:
        err = f.exception()
        try:
            if err is None:
                out.set_result(f.result())
            elif not isinstance(err, ReplicaCrashError):
                out.set_exception(err)
            elif len(chunk) == 1:
                out.set_result([ImageOutcome.failed(start, None, ("ImageDecodeError", CRASH_MESSAGE))])
            else:
                relay(joined_lists([_isolated(replicas, [d], max_pixels, start + i) for i, d in enumerate(chunk)]), out)
        except BaseException as e:  # noqa: BLE001 - e.g. the pool closed meanwhile: the waiter hears it
            if not out.done():
                out.set_exception(e)

    replicas.submit(decode_uploads, chunk, max_pixels, start).add_done_callback(done)
    return out


CRASH_MESSAGE = ("decoding this image killed the engine replica twice; it likely crashes the image library or "
                 "exhausts memory - re-export it as PNG or JPEG")


def decode_uploads(core: ForwardCore, datas: list[bytes], max_pixels: int | None, start: int = 0) -> list[ImageOutcome]:
    """In a replica: each upload decoded (a bad one is an error outcome, in place), the good ones embedded."""
    transform = core.loaded.preprocess
    return embed_decoded(core, [decode_input(start + i, data, transform, max_pixels=max_pixels)
                                for i, data in enumerate(datas)])
