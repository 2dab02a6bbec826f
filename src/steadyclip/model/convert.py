"""Convert a checkpoint to safetensors, and prove the tensors survived the trip.

``convert_checkpoint`` reads the source the safe way (``steadyclip.model.checkpoints``: no
code runs), writes safetensors, then reads the output back and compares state
fingerprints; an output that differs is deleted, never left behind.

Example:
    >>> from steadyclip.model.convert import convert_checkpoint
    >>> convert_checkpoint("old.pt", "model.safetensors").fingerprint[:12]
"""
from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from steadyclip.errors import InputError, IntegrityError
from steadyclip.model import checkpoints, integrity

_logger = logging.getLogger(__name__)

__all__ = ["Conversion", "check_output_path", "convert_checkpoint"]


@dataclass(frozen=True)
class Conversion:
    """A finished, verified conversion.

    Attributes:
        source: the checkpoint read.
        output: the safetensors file written.
        tensors: tensors written.
        cloned_shared: tensors that shared storage (tied weights) and were written as copies.
        source_format: the format detected in ``source``.
        fingerprint: state fingerprint of the output, equal to the source's.
        sha256: SHA-256 of the output file.
    """

    source: str
    output: str
    tensors: int
    cloned_shared: int
    source_format: str
    fingerprint: str
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_output_path(checkpoint: str | os.PathLike[str], output: str | os.PathLike[str]) -> None:
    """Refuse an output that is not a new ``.safetensors`` file.

    Raises:
        InputError: the output does not end in ``.safetensors`` or is the input itself.
    """
    out = Path(output)
    if out.suffix != ".safetensors":
        raise InputError(f"the output {os.fspath(output)!r} must end in .safetensors; name it e.g. model.safetensors")
    if out.resolve() == Path(checkpoint).resolve():
        raise InputError(f"the output {os.fspath(output)!r} is the input; write the conversion to another file")


def convert_checkpoint(
    checkpoint: str | os.PathLike[str], output: str | os.PathLike[str], *, allow_torchscript: bool = False
) -> Conversion:
    """Write ``checkpoint``'s tensors to ``output`` as safetensors, verified by a read-back.

    Args:
        checkpoint: a ``.pt``/``.pth``/``.bin`` (or any format ``checkpoints`` reads).
        output: the ``.safetensors`` file to write (replaced atomically).
        allow_torchscript: allow a TorchScript archive (reading one runs its code).
    Raises:
        InputError: see ``check_output_path``.
        UnsafeCheckpointError, WeightsError: the checkpoint cannot be read safely.
        IntegrityError: the tensors read back differ (the output is removed).
    """
    from safetensors.torch import load_file

    check_output_path(checkpoint, output)
    summary = checkpoints.convert_to_safetensors(checkpoint, output, allow_torchscript=allow_torchscript)
    before = integrity.state_fingerprint(checkpoints.read_state_dict(checkpoint, allow_torchscript=allow_torchscript))
    after = integrity.state_fingerprint(load_file(os.fspath(output)))
    if before != after:
        Path(output).unlink(missing_ok=True)
        raise IntegrityError(f"conversion changed the tensors (fingerprint {before} -> {after}); output "
                             f"{os.fspath(output)} removed. Report this with the checkpoint's format.")
    _logger.info("converted %s -> %s (%d tensors, fingerprint %s)", summary["source"], summary["output"],
                 summary["tensors"], after[:12])
    return Conversion(source=summary["source"], output=summary["output"], tensors=int(summary["tensors"]),
                      cloned_shared=int(summary["cloned_shared"]), source_format=str(summary["source_format"]),
                      fingerprint=after, sha256=integrity.sha256_file(output))
