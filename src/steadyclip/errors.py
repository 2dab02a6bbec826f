"""The one exception tree of steadyclip.

    SteadyClipError
    ├── ModelSourceError        unknown model/tag, missing file, unreadable source
    ├── WeightsError            missing/unexpected keys, shape mismatch, unsafe file
    │   └── UnsafeCheckpointError   pickle needing code, TorchScript not allowed
    ├── IntegrityError          hash/fingerprint/lock mismatch, in-memory tampering
    │   ├── LockMismatchError       a lockfile field differs (carries field, expected, actual)
    │   └── PortableProofError      portable probe rows differ from the golden digests of this stack
    ├── InferenceStateError     model in train mode under a strict guard
    ├── InputError              bad user input
    │   ├── ImageError              base for images
    │   │   ├── ImageDecodeError        corrupt, truncated, unknown format
    │   │   ├── ImageTooLargeError      pixel cap exceeded (decompression bomb)
    │   │   └── ImageSourceError        missing file, wrong type
    │   ├── TextInputError          a batch text that cannot be embedded (blank, not UTF-8, missing)
    │   ├── LabelError              empty, blank, duplicate, non-string labels
    │   ├── TemplateError           bad prompt templates
    │   └── ResultFileError         not a steadyclip result, truncated, edited into nonsense (verify)
    ├── NumericsError           NaN/Inf in embeddings, logits or weights
    ├── CacheError              text-cache entry unusable (recomputed, never used)
    ├── BatchJobError           resume refused (changed inputs/model), bad manifest
    ├── ReplicaCrashError       a task killed engine replicas twice (crashing decoder, out of memory)
    └── DeviceError             device or precision not available (never a silent fallback)
        └── PortableSetupError      this process's numerics were fixed before portable could pin them
"""
from __future__ import annotations

__all__ = [
    "BatchJobError",
    "CacheError",
    "DeviceError",
    "ImageDecodeError",
    "ImageError",
    "ImageSourceError",
    "ImageTooLargeError",
    "InferenceStateError",
    "InputError",
    "IntegrityError",
    "LabelError",
    "LockMismatchError",
    "ModelSourceError",
    "NumericsError",
    "PortableProofError",
    "PortableSetupError",
    "ReplicaCrashError",
    "ResultFileError",
    "SteadyClipError",
    "TemplateError",
    "TextInputError",
    "UnsafeCheckpointError",
    "WeightsError",
]


class SteadyClipError(Exception):
    """Base of every error steadyclip raises on purpose."""


class ModelSourceError(SteadyClipError):
    """The model source cannot be resolved: unknown name or tag, missing file."""


class WeightsError(SteadyClipError):
    """The weights do not fit the model: missing/unexpected keys, wrong shapes."""


class UnsafeCheckpointError(WeightsError):
    """The checkpoint would need arbitrary code to load; it was refused unread."""


class IntegrityError(SteadyClipError):
    """A hash or fingerprint differs from what was expected."""


class LockMismatchError(IntegrityError):
    """A lockfile field differs from the loaded model's."""

    def __init__(self, message: str, *, field: str, expected: object, actual: object) -> None:
        super().__init__(message)
        self.field = field
        self.expected = expected
        self.actual = actual


class PortableProofError(IntegrityError):
    """A portable engine's probe rows differ from the golden digests made on another CPU with this stack."""


class InferenceStateError(SteadyClipError):
    """The model left inference state (train mode) and the guard is strict."""


class InputError(SteadyClipError, ValueError):
    """Bad input from the user."""


class ImageError(InputError):
    """An image could not be used."""


class ImageDecodeError(ImageError):
    """The image is corrupt, truncated or in an unknown format."""


class ImageTooLargeError(ImageError):
    """The image has more pixels than the configured cap."""


class ImageSourceError(ImageError):
    """The image source is missing or of an unsupported type."""


class TextInputError(InputError):
    """A text of a batch job cannot be embedded: blank, not valid UTF-8, or a missing cell."""


class LabelError(InputError):
    """The label list is empty, or has blank, duplicate or non-string labels."""


class TemplateError(InputError):
    """A prompt template is malformed."""


class ResultFileError(InputError):
    """A file given to ``verify`` is not a readable steadyclip result."""


class NumericsError(SteadyClipError):
    """A non-finite value appeared in weights, embeddings or logits."""


class CacheError(SteadyClipError):
    """A cache entry is unusable."""


class BatchJobError(SteadyClipError):
    """A batch job cannot run or resume as asked."""


class DeviceError(SteadyClipError):
    """The requested device or precision is not available."""


class ReplicaCrashError(SteadyClipError):
    """An engine replica process died running a task, twice; its inputs hold the culprit."""


class PortableSetupError(DeviceError):
    """This process cannot compute portable rows (its numerics were fixed before steadyclip could pin them)."""
