"""Checkpoint files: recognise the format, read tensors safely, apply them strictly.

Formats, by what the bytes say (never by the file name):

- safetensors: read as-is (no code can run).
- torch.save zip archive or legacy pickle: ``torch.load(weights_only=True)`` only;
  a pickle that needs any other global (i.e. would run code) is refused with
  ``UnsafeCheckpointError`` and its payload never runs.
- TorchScript archive (zip with ``constants.pkl`` / ``code/``): refused unless
  ``allow_torchscript=True``, because loading it runs TorchScript code.

Layouts handled like open_clip's own ``load_checkpoint`` (the safe parts):
``{"state_dict": ...}`` wrappers, ``module.`` prefixes, third-party key
conversions (MobileCLIP), old text-tower key names, scalar vs 1-d logit scale,
stale ``position_ids``. Not mirrored: positional-embedding resizing (changes
the weights) and zero-filling a missing ``logit_bias`` (hides a missing key).
"""
from __future__ import annotations

import logging
import os
import pickle
import re
import struct
import zipfile
from collections.abc import Mapping
from enum import Enum
from pathlib import Path
from typing import Any

import torch

from steadyclip._util.atomic import atomic_path
from steadyclip.errors import (
    ModelSourceError,
    SteadyClipError,
    UnsafeCheckpointError,
    WeightsError,
)

_logger = logging.getLogger(__name__)

__all__ = [
    "CheckpointFormat",
    "apply_state_dict",
    "convert_to_safetensors",
    "detect_format",
    "format_keys",
    "normalize_state_dict",
    "read_state_dict",
]

# The file names a weights file usually has (a format is judged from its bytes, never from this);
# used to spot a path among tag names and to find the one weights file of a folder.
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")


class CheckpointFormat(str, Enum):
    SAFETENSORS = "safetensors"
    TORCH_ZIP = "torch-zip"
    TORCH_LEGACY = "torch-legacy"
    TORCHSCRIPT = "torchscript"
    UNKNOWN = "unknown"


def detect_format(path: str | os.PathLike[str]) -> CheckpointFormat:
    """What kind of checkpoint ``path`` is, judged from its bytes."""
    p = Path(path)
    with open(p, "rb") as f:
        head = f.read(16)
    if head[:4] == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(p) as zf:
                names = zf.namelist()
        except zipfile.BadZipFile:
            return CheckpointFormat.UNKNOWN
        if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
            return CheckpointFormat.TORCHSCRIPT
        if any(n.endswith("/data.pkl") or n == "data.pkl" for n in names):
            return CheckpointFormat.TORCH_ZIP
        return CheckpointFormat.UNKNOWN
    if len(head) >= 9:
        (header_len,) = struct.unpack("<Q", head[:8])
        if 2 <= header_len <= 100_000_000 and head[8:9] == b"{":
            return CheckpointFormat.SAFETENSORS
    if head[:1] == b"\x80":  # pickle protocol opcode: torch's legacy (pre-1.6) format
        return CheckpointFormat.TORCH_LEGACY
    return CheckpointFormat.UNKNOWN


def _unsupported_global(message: str) -> str:
    m = re.search(r"GLOBAL ([\w.]+)", message)
    return m.group(1) if m else "an unsupported object"


def read_state_dict(path: str | os.PathLike[str], *, allow_torchscript: bool = False) -> dict[str, torch.Tensor]:
    """Read the tensors of a checkpoint file without running code from it.

    Raises:
        ModelSourceError: the file does not exist.
        UnsafeCheckpointError: the file would need arbitrary code (or TorchScript, not allowed).
        WeightsError: unreadable, truncated, unknown format, or no tensor state dict inside.
    """
    p = Path(path)
    if not p.is_file():
        raise ModelSourceError(f"checkpoint file {p} does not exist (or is not a file)")
    fmt = detect_format(p)
    _logger.debug("reading %s as %s", p, fmt.value)
    if fmt is CheckpointFormat.SAFETENSORS:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            obj: Any = load_file(str(p), device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise WeightsError(f"{p} is not a readable safetensors file ({e}); it may be truncated or corrupt") from e
    elif fmt in (CheckpointFormat.TORCH_ZIP, CheckpointFormat.TORCH_LEGACY):
        try:
            obj = torch.load(p, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise UnsafeCheckpointError(
                f"{p} is a pickle that needs {_unsupported_global(str(e))} to load, i.e. it would run code; "
                "refused without running it. If you trust the file, convert it in a sandbox to safetensors "
                "(`steadyclip convert`) after re-saving only its tensors."
            ) from e
        except (RuntimeError, EOFError, OSError, ValueError) as e:
            raise WeightsError(f"{p} is not a readable torch checkpoint ({e}); it may be truncated or corrupt") from e
    elif fmt is CheckpointFormat.TORCHSCRIPT:
        if not allow_torchscript:
            raise UnsafeCheckpointError(
                f"{p} is a TorchScript archive; loading it runs the TorchScript code inside. Refused. "
                "Pass allow_torchscript=True (CLI: --allow-torchscript) if you trust it, or convert it once "
                "to safetensors with `steadyclip convert --allow-torchscript`."
            )
        _logger.warning("loading TorchScript archive %s (allow_torchscript=True)", p)
        try:
            scripted = torch.jit.load(str(p), map_location="cpu")  # type: ignore[no-untyped-call]
        except RuntimeError as e:
            raise WeightsError(f"{p} is not a loadable TorchScript archive ({e})") from e
        obj = dict(scripted.state_dict())
        for key in ("input_resolution", "context_length", "vocab_size"):  # OpenAI JIT extras
            obj.pop(key, None)
    else:
        raise WeightsError(
            f"{p} is not a checkpoint format steadyclip reads (safetensors, torch.save zip or legacy pickle); "
            "it may be truncated, or another format (e.g. numpy .npz)."
        )
    return _unwrap(obj, p)


def _unwrap(obj: Any, p: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not obj:
        raise WeightsError(f"{p} holds {type(obj).__name__}, not a non-empty state dict of tensors")
    bad = sorted(str(k) for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor))
    if bad:
        raise WeightsError(f"{p}: state dict entries that are not tensors: {format_keys(bad)}")
    sd: dict[str, torch.Tensor] = dict(obj)
    if all(k.startswith("module.") for k in sd):  # saved from DistributedDataParallel
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def normalize_state_dict(model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Key/shape fixes open_clip applies to its own checkpoints (none change tensor values)."""
    from open_clip.convert import convert_state_dict
    from open_clip.model import convert_to_custom_text_state_dict

    sd: dict[str, torch.Tensor] = convert_state_dict(model, state_dict)
    if "positional_embedding" in sd and not hasattr(model, "positional_embedding"):
        sd = convert_to_custom_text_state_dict(sd)
    for name in ("logit_scale", "logit_bias"):
        target = getattr(model, name, None)
        if (name in sd and isinstance(target, torch.Tensor) and sd[name].ndim != target.ndim
                and sd[name].numel() == target.numel()):
            sd[name] = sd[name].reshape(target.shape)
    position_id_key = "text.transformer.embeddings.position_ids"
    if position_id_key in sd and position_id_key not in model.state_dict():
        del sd[position_id_key]
    return sd


def format_keys(keys: list[str], limit: int = 10) -> str:
    """A sorted, readable, truncated key list."""
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    more = f", ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return f"[{shown}{more}] ({len(keys)} total)"


def apply_state_dict(
    model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], *, allow_partial: bool = False, source: str = ""
) -> list[str]:
    """Copy ``state_dict`` into ``model``; anything that does not fit is an error.

    Missing keys are an error unless ``allow_partial`` (then they are logged and
    returned); unexpected keys and shape mismatches are always errors.

    Returns:
        The sorted missing keys (empty for a full load).
    Raises:
        WeightsError: naming the keys that are missing, unexpected or mis-shaped.
    """
    expected = model.state_dict()
    where = f" in {source}" if source else ""
    unexpected = sorted(set(state_dict) - set(expected))
    missing = sorted(set(expected) - set(state_dict))
    shapes = sorted(
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(state_dict) & set(expected)
        if state_dict[k].shape != expected[k].shape
    )
    problems = []
    if shapes:
        problems.append(f"shape mismatch {format_keys(shapes, 5)}")
    if unexpected:
        problems.append(f"unexpected keys {format_keys(unexpected)}")
    if missing and not allow_partial:
        problems.append(f"missing keys {format_keys(missing)}")
    if problems:
        raise WeightsError(
            f"weights{where} do not fit the model: " + "; ".join(problems) + ". Check the architecture name matches "
            "the checkpoint (and quick_gelu/custom_text); a partial load needs allow_partial=True."
        )
    if missing:
        _logger.warning("partial load%s (allow_partial=True): %d keys keep their initial values: %s",
                        where, len(missing), format_keys(missing))
    # strict=False only because the missing set was checked above; dtypes are cast by copy_.
    model.load_state_dict(dict(state_dict), strict=False)
    return missing


def convert_to_safetensors(
    src: str | os.PathLike[str], dst: str | os.PathLike[str], *, allow_torchscript: bool = False
) -> dict[str, Any]:
    """Read a checkpoint safely and write its tensors as safetensors.

    Tensors that share storage (tied weights) are cloned, since safetensors
    stores each tensor's bytes separately.

    Returns:
        A summary: source, destination, number of tensors, format read.
    """
    from safetensors.torch import save_file

    fmt = detect_format(src)
    sd = read_state_dict(src, allow_torchscript=allow_torchscript)
    seen: set[tuple[int, int]] = set()
    out: dict[str, torch.Tensor] = {}
    cloned = 0
    for k in sorted(sd):
        t = sd[k]
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key in seen or not t.is_contiguous() or t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone().contiguous()
            cloned += 1
        seen.add(key)
        out[k] = t
    dst_p = Path(dst)
    try:
        with atomic_path(dst_p) as tmp:
            save_file(out, str(tmp), metadata={"converted_by": "steadyclip", "source_format": fmt.value})
    except OSError as e:
        raise SteadyClipError(f"cannot write {dst_p}: {e}; check that its folder exists and is writable") from e
    return {"source": os.fspath(src), "output": os.fspath(dst_p), "tensors": len(out),
            "cloned_shared": cloned, "source_format": fmt.value}
