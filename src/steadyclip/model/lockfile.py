"""Lockfiles: a JSON record of exactly which model a result came from.

Format (version 1)::

    {
      "steadyclip_lock": 1,
      "model": {model_id, arch, source, pretrained, revision, weights_files,
                weights_sha256, fingerprint, config_hash, preprocess, tokenizer,
                context_length},
      "versions": identity.software_stack() (python, torch, open_clip_torch, timm, numpy, ...),
      ...                      # extra sections (e.g. "probe") are kept as written
    }

``compare_lock`` refuses any difference in what defines the model (hashes,
fingerprint, config, preprocessing, tokenizer, revision) with a
``LockMismatchError`` naming the field and both values. Library versions are
compared too but only logged: a new torch does not change the weights, and
numeric drift is what a behaviour probe is for.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from steadyclip._util.atomic import write_atomic
from steadyclip.errors import (
    InputError,
    LockMismatchError,
    SteadyClipError,
)
from steadyclip.numerics import identity

_logger = logging.getLogger(__name__)

__all__ = ["LOCKED_FIELDS", "LOCK_VERSION", "compare_lock", "make_lock", "read_lock", "write_lock"]

LOCK_VERSION = 1

# Fields of ModelInfo that must match exactly; source paths and model ids may differ
# between machines (the same bytes can live anywhere), so they are recorded, not compared.
LOCKED_FIELDS: tuple[str, ...] = (
    "arch",
    "revision",
    "weights_sha256",
    "fingerprint",
    "config_hash",
    "preprocess",
    "tokenizer",
    "context_length",
)


class _HasToDict(Protocol):
    def to_dict(self) -> dict[str, Any]: ...


def _info_dict(info: _HasToDict | Mapping[str, Any]) -> dict[str, Any]:
    return dict(info) if isinstance(info, Mapping) else info.to_dict()


def make_lock(info: _HasToDict | Mapping[str, Any], **extra: Any) -> dict[str, Any]:
    """The lock document for a loaded model's info, plus extra sections (e.g. ``probe=...``)."""
    reserved = {"steadyclip_lock", "model", "versions"} & extra.keys()
    if reserved:
        raise InputError(f"extra lock sections may not be named {sorted(reserved)}")
    # Round-trip through JSON so the in-memory lock equals what a read returns (tuples -> lists).
    doc: dict[str, Any] = {"steadyclip_lock": LOCK_VERSION, "model": _info_dict(info),
                           "versions": identity.software_stack()}
    doc.update(extra)
    result: dict[str, Any] = json.loads(json.dumps(doc, allow_nan=False))
    return result


def write_lock(path: str | os.PathLike[str], info: _HasToDict | Mapping[str, Any], **extra: Any) -> dict[str, Any]:
    """Write a lockfile atomically; returns the document written."""
    doc = make_lock(info, **extra)
    p = Path(path)
    text = json.dumps(doc, indent=2, sort_keys=True, allow_nan=False) + "\n"
    try:
        write_atomic(p, text)
    except OSError as e:
        raise SteadyClipError(f"cannot write lockfile {p}: {e}; check that its folder exists and is writable") from e
    return doc


def read_lock(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and validate a lockfile.

    Raises:
        InputError: missing, unreadable, not a steadyclip lock, or a newer format (the check cannot run:
            exit 1, not the exit 3 of a failed check).
    """
    p = Path(path)
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise InputError(f"lockfile {p} does not exist; create one with `steadyclip lock MODEL -o {p}`") from e
    except (OSError, ValueError) as e:
        raise InputError(f"lockfile {p} is not readable JSON ({e}); re-create it with `steadyclip lock`") from e
    if not isinstance(doc, dict) or "steadyclip_lock" not in doc or not isinstance(doc.get("model"), dict):
        raise InputError(f"{p} is not a steadyclip lockfile (no 'steadyclip_lock' version and 'model' section)")
    if doc["steadyclip_lock"] != LOCK_VERSION:
        raise InputError(
            f"lockfile {p} has format version {doc['steadyclip_lock']!r}; this steadyclip reads version "
            f"{LOCK_VERSION}. Upgrade steadyclip or re-create the lock."
        )
    return doc


def compare_lock(lock: Mapping[str, Any], info: _HasToDict | Mapping[str, Any]) -> None:
    """Check a loaded model against a lock; the first differing field raises.

    Raises:
        LockMismatchError: carrying ``field``, ``expected`` (the lock's) and ``actual``.
    """
    expected_model = lock["model"]
    actual_model = json.loads(json.dumps(_info_dict(info)))
    for field in LOCKED_FIELDS:
        if field not in expected_model:
            continue  # a lock written by hand may pin less
        exp, act = expected_model[field], actual_model.get(field)
        if isinstance(exp, dict) and isinstance(act, dict):
            for sub in sorted(exp.keys() | act.keys()):
                if exp.get(sub) != act.get(sub):
                    _mismatch(f"{field}.{sub}", exp.get(sub), act.get(sub))
        elif exp != act:
            _mismatch(field, exp, act)
    now = identity.software_stack()
    for name, ver in sorted((lock.get("versions") or {}).items()):
        if _comparable(name, ver, now.get(name)) != ver:
            _logger.warning("lock was made with %s %s, this is %s %s", name, ver, name, now.get(name))


def _comparable(name: str, locked: str, now: str | None) -> str | None:
    """This stack's version of ``name`` in the form the lock recorded it.

    Locks always keyed versions by distribution name (python, torch, open_clip_torch, ...), the
    keys of ``identity.software_stack()``, so no key needs mapping; a lock from before numpy and
    pillow were recorded pins fewer, and only what a lock pins is compared. But those locks read
    torch's distribution version ("2.14.1"), without the build tag ``torch.__version__`` carries
    ("2.14.1+cu130"): such a lock is compared without the tag.
    """
    if name == "torch" and now is not None and "+" not in locked:
        return now.split("+")[0]
    return now


def _mismatch(field: str, expected: object, actual: object) -> None:
    raise LockMismatchError(
        f"lock mismatch in {field}: lock has {expected!r}, loaded model has {actual!r}. "
        "Load the exact model the lock was made from, or re-create the lock with `steadyclip lock`.",
        field=field,
        expected=expected,
        actual=actual,
    )
