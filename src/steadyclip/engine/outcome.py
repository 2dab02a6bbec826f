"""One input's outcome, the same shape everywhere: the engine's rows, the server's uploads, batch rows.

:func:`decode_input` is the one way an input (path, bytes, PIL image) becomes pixels for the model:
it decodes (:func:`~steadyclip.engine.images.decode_into`), applies the model's transform, and
returns an :class:`ImageOutcome` without an embedding yet, plus the pixels (3, H, W) - or, for a
bad input, the outcome with its error and no pixels. It never raises an
:class:`~steadyclip.errors.ImageError`. After the model, :meth:`ImageOutcome.embedded` adds the
embedding. Engine replicas, decoder processes and Ray actors all send outcomes back; the error
travels as its class name and message, and :meth:`ImageOutcome.exception` rebuilds it
(:func:`steadyclip.engine.errmap.rebuild`). Front ends only render outcomes:
:meth:`ImageOutcome.failure` is the public row of ``EmbedReport``/``ClassifyReport``, the batch
table writes the fields as columns.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from steadyclip.engine import errmap, images
from steadyclip.errors import ImageError, SteadyClipError
from steadyclip.results import ImageFailure

if TYPE_CHECKING:
    import numpy as np
    import torch

    from steadyclip.engine.images import ImageInput

_logger = logging.getLogger(__name__)

__all__ = ["ImageOutcome", "decode_input", "unexpected_failure"]

Transform = Callable[[Any], "torch.Tensor"]


@dataclass(frozen=True, slots=True, eq=False)
class ImageOutcome:
    """What happened to one input: its embedding, or the error that refused it; its decoders' warnings.

    ``error_type``/``error_message`` are the error's class name and text (``None`` when it worked):
    they cross processes and land in batch Parquet as they are.
    """

    index: int  # position of the input in what the caller passed
    source: str | None  # the input's path as given (None: bytes, a PIL image)
    sha256: str | None = None  # of the input's bytes, where they were read and asked for
    embedding: np.ndarray | None = None  # (D,) L2-normalised float32, once the model ran
    error_type: str | None = None
    error_message: str | None = None
    warnings: tuple[str, ...] = ()  # what the decoders (Pillow, libtiff) warned about, in order

    @classmethod
    def failed(cls, index: int, source: str | None, error: BaseException | tuple[str, str], *,
               sha256: str | None = None, warnings: tuple[str, ...] = ()) -> ImageOutcome:
        """An outcome refused by ``error`` (an exception, or its class name and message)."""
        name, message = errmap.describe(error) if isinstance(error, BaseException) else error
        return cls(index, source, sha256, None, name, message, warnings)

    @property
    def ok(self) -> bool:
        return self.error_type is None

    def embedded(self, vector: np.ndarray) -> ImageOutcome:
        """This outcome with its embedding (D,)."""
        return dataclasses.replace(self, embedding=vector)

    def exception(self) -> SteadyClipError | None:
        """The typed error that refused this input (e.g. ``ImageDecodeError``), or ``None``."""
        if self.error_type is None:
            return None
        return errmap.rebuild(self.error_type, self.error_message or "", origin="an image decoder")

    def failure(self) -> ImageFailure:
        """The public failure row (``EmbedReport``/``ClassifyReport``) of a refused input."""
        return ImageFailure(self.index, self.source, self.error_type or "", self.error_message or "")


def decode_input(
    index: int,
    src: ImageInput,
    transform: Transform,
    *,
    source: str | None = None,
    name: str | None = None,
    max_pixels: int | None = None,
    sha256: bool = False,
    unexpected: Literal["raise", "row"] = "raise",
) -> tuple[ImageOutcome, torch.Tensor | None]:
    """Decode one input and apply the model's transform: its outcome (no embedding yet) and pixels.

    Args:
        index: the input's position, kept on the outcome.
        src: a path, the file's bytes, a binary file object or a PIL image.
        transform: the model's eval transform (``LoadedModel.preprocess``): RGB image -> (3, H, W).
        source: the input's name on the outcome (a path as listed).
        name: how error messages name the input (default: its path or ``<bytes len=N>``).
        max_pixels: pixel cap (``None``: :data:`~steadyclip.engine.images.DEFAULT_MAX_PIXELS`).
        sha256: hash ``src`` when it is bytes (the batch runner's ``sha256`` column).
        unexpected: ``"row"`` keeps an error no decoder should raise as a row (logged) instead of raising.

    Returns:
        ``(outcome, pixels)``; ``pixels`` is ``None`` exactly when ``outcome`` holds an error.
    """
    digest = hashlib.sha256(src).hexdigest() if sha256 and isinstance(src, (bytes, bytearray)) else None
    notes: list[str] = []
    try:
        pixels = transform(images.decode_into(notes, src, max_pixels=max_pixels, name=name))
    except ImageError as e:
        return ImageOutcome.failed(index, source, e, sha256=digest, warnings=tuple(notes)), None
    except Exception as e:
        if unexpected == "raise":
            raise
        return unexpected_failure(index, source, e, sha256=digest, warnings=tuple(notes)), None
    return ImageOutcome(index, source, digest, warnings=tuple(notes)), pixels


def unexpected_failure(index: int, source: str | None, e: BaseException, *, sha256: str | None = None,
                       warnings: tuple[str, ...] = ()) -> ImageOutcome:
    """A row for an error no decoder should raise (a bug): logged, kept with its real class name."""
    _logger.warning("unexpected %s while preparing %s: %s", type(e).__name__, source, e)
    name, message = errmap.describe(e, unexpected=True)
    return ImageOutcome(index, source, sha256, None, name, message, warnings)
