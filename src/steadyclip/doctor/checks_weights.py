"""Check 2 and 8: are these the same weights every time, the pinned ones, and finite?

``random_init`` vs ``weights_changed`` is decided by experiment, not guessed:
the loader runs twice with different RNG seeds; if the weights differ, it runs
once more with the first seed. Same seed -> same weights means the weights come
from the random number generator (no checkpoint applied, or keys missing from
it); different weights under the same seed mean the source itself changed
between loads (a file rewritten, a moving "latest" download).
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from steadyclip.doctor.result import Cause, Findings
from steadyclip.doctor.state import bitwise_equal, cuda_initialized
from steadyclip.errors import InputError

_logger = logging.getLogger(__name__)

__all__ = ["Loaded", "call_loader", "check_corrupted", "check_non_finite", "compare_loads", "unpack_loaded"]

SEED_A, SEED_B = 1234, 5678
_LIST = 20

FIX_RANDOM_INIT = """\
# build the model WITH its weights - a wrong/missing tag or a failed load leaves random ones
model, _, preprocess = open_clip.create_model_and_transforms(ARCH, pretrained=TAG_OR_FILE)
# if you load a state dict yourself, let it fail loudly instead of skipping keys:
model.load_state_dict(state_dict, strict=True)
# steadyclip refuses random or partial weights and pins their hash:
#   steadyclip lock ARCH --pretrained TAG_OR_FILE -o steadyclip.lock
#   model = steadyclip.load(ARCH, pretrained=TAG_OR_FILE, lock="steadyclip.lock")"""

FIX_WEIGHTS_CHANGED = """\
# pin the exact bytes: copy the checkpoint somewhere nothing rewrites it, lock it, load it verified
#   steadyclip lock ARCH --pretrained /pinned/model.safetensors -o steadyclip.lock
model = steadyclip.load(ARCH, pretrained="/pinned/model.safetensors", lock="steadyclip.lock")
# from the hub, pin a revision: steadyclip.load("hf-hub:ORG/REPO@COMMIT_SHA")"""

FIX_CORRUPTED = """\
# the weights are not the bytes that were pinned: delete the file and fetch it again, then verify
#   steadyclip verify ARCH --pretrained TAG_OR_FILE --lock steadyclip.lock
model = steadyclip.load(ARCH, pretrained=TAG_OR_FILE, lock="steadyclip.lock")   # refuses any other bytes"""

FIX_NON_FINITE = """\
# NaN/Inf weights: the checkpoint is broken - fetch it again and verify its hash
# NaN/Inf outputs with finite weights: fp16 overflow - run in float32 (or bf16), not fp16
model = model.float()
# steadyclip.load() refuses non-finite weights; its engine raises NumericsError on non-finite outputs"""


@dataclass
class Loaded:
    """One call of the user's loader: the model, a preprocess if it returned one, and identities."""

    model: torch.nn.Module
    preprocess: Callable[[Any], torch.Tensor] | None
    fingerprint: str
    file_sha256: str | None
    log: list[str] = field(default_factory=list)


def unpack_loaded(out: object) -> tuple[torch.nn.Module, Callable[[Any], torch.Tensor] | None]:
    """Accept what loaders return: a model, ``create_model_and_transforms``' tuple, or a ``LoadedModel``.

    Raises:
        InputError: nothing that looks like a model.
    """
    if isinstance(out, torch.nn.Module):
        return out, None
    inner = getattr(out, "model", None)
    if isinstance(inner, torch.nn.Module):
        return inner, getattr(out, "preprocess", None)
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.nn.Module):
        pre = out[-1] if len(out) >= 2 and callable(out[-1]) else None
        return out[0], pre
    raise InputError(
        f"loader() returned {type(out).__name__}; it must return the model, a tuple starting with the model "
        "(like open_clip.create_model_and_transforms) or a steadyclip LoadedModel"
    )


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if len(self.messages) < 10:
            self.messages.append(f"{record.levelname} {record.name}: {record.getMessage()}"[:300])


@contextmanager
def _captured_warnings() -> Iterator[list[str]]:
    handler = _Capture()
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield handler.messages
    finally:
        root.removeHandler(handler)


def _file_hash(path: Path | None) -> str | None:
    if path is None or not path.is_file():
        return None
    from steadyclip.model.integrity import sha256_file

    return sha256_file(path, cache=None)  # a file that changes under us must be re-read, never cached


def call_loader(loader: Callable[[], object], *, seed: int, weights_file: Path | None = None) -> Loaded:
    """Run the user's loader under a known RNG seed (the caller's RNG state is left alone)."""
    from steadyclip.model.integrity import state_fingerprint

    devices = list(range(torch.cuda.device_count())) if cuda_initialized() else []
    with torch.random.fork_rng(devices=devices), _captured_warnings() as log:
        torch.manual_seed(seed)
        out = loader()
    model, pre = unpack_loaded(out)
    # hashed right after the load: the bytes this load most likely read (a loader may write the file first)
    return Loaded(model, pre, state_fingerprint(model), _file_hash(weights_file), list(log))


def differing(a: torch.nn.Module, b: torch.nn.Module) -> tuple[list[str], int]:
    """Names of state tensors that are not bitwise equal (or missing on one side), and the total count."""
    sa, sb = a.state_dict(), b.state_dict()
    names = sorted(sa.keys() | sb.keys())
    diff = []
    for n in names:
        ta, tb = sa.get(n), sb.get(n)
        if ta is None or tb is None or ta.shape != tb.shape or ta.dtype != tb.dtype or not bitwise_equal(ta, tb):
            diff.append(n)
    return diff, len(names)


def compare_loads(
    findings: Findings,
    *,
    a: Loaded,
    b: Loaded,
    reload: Callable[[int], Loaded],
    effect: Callable[[Loaded, Loaded], float],
    weights_file: Path | None,
) -> str | None:
    """``random_init`` / ``weights_changed`` from two loads; returns the cause id found, or None."""
    if a.fingerprint == b.fingerprint:
        findings.ok("random_init", f"two loads gave the same state fingerprint {a.fingerprint[:16]}")
        findings.ok("weights_changed", "the weights were bitwise identical on both loads")
        return None
    names, total = differing(a.model, b.model)
    sev = effect(a, b)
    evidence: dict[str, Any] = {
        "fingerprints": [a.fingerprint, b.fingerprint],
        "differing_tensors": len(names),
        "total_tensors": total,
        "names": names[:_LIST],
        "max_abs_prob_diff_between_loads": sev,
        "loader_warnings": sorted(set(a.log + b.log)),
    }
    if weights_file is not None:
        evidence["weights_file"] = str(weights_file)
        evidence["file_sha256_per_load"] = [a.file_sha256, b.file_sha256]
    file_changed = a.file_sha256 is not None and b.file_sha256 is not None and a.file_sha256 != b.file_sha256
    same_seed_same_weights = False
    if not file_changed:
        c = reload(SEED_A)
        same_seed_same_weights = c.fingerprint == a.fingerprint
        evidence["same_seed_reload_fingerprint"] = c.fingerprint
        evidence["same_seed_reproduces_weights"] = same_seed_same_weights
        del c
    if same_seed_same_weights:
        said_random = [w for w in evidence["loader_warnings"] if "random" in w.lower()]
        what = ("no weights were loaded: the model is randomly initialised" if said_random else
                f"{len(names)} of {total} tensors keep their random initial values: not in the checkpoint, "
                "or the checkpoint was never applied")
        findings.add(Cause(
            "random_init", sev, "problem",
            f"every load gives new weights drawn from the random number generator ({what}); "
            f"probabilities differ by up to {sev:.3g} between two loads",
            evidence, FIX_RANDOM_INIT,
        ))
        findings.ok("weights_changed", "the differences come from the RNG, not from a changing source")
        return "random_init"
    evidence["file_changed_between_loads"] = file_changed
    findings.add(Cause(
        "weights_changed", sev, "problem",
        f"the loader returned different weights on two loads ({len(names)} of {total} tensors differ"
        + (", the weights file's SHA-256 changed" if file_changed else ", even under the same RNG seed")
        + f"); probabilities differ by up to {sev:.3g}",
        evidence, FIX_WEIGHTS_CHANGED,
    ))
    findings.ok("random_init", "the weights changed even under the same RNG seed: not random initialisation")
    return "weights_changed"


def check_corrupted(
    findings: Findings,
    *,
    fingerprint: str,
    weights_file: Path | None,
    lock: str | os.PathLike[str] | Mapping[str, Any] | None,
    expected_sha256: str | None,
) -> None:
    """``weights_corrupted``: the file's SHA-256 or the model's fingerprint differs from a lock or known hash.

    Compared the library's way: a lock by :func:`steadyclip.model.lockfile.compare_lock`, a known
    hash (or hash prefix) by :func:`steadyclip.model.integrity.sha256_matches`.
    """
    from steadyclip.model.integrity import sha256_matches
    from steadyclip.model.lockfile import read_lock

    pinned: dict[str, Any] = {}
    source = "expected_sha256"
    if lock is not None:
        doc = read_lock(lock) if not isinstance(lock, Mapping) else lock
        pinned = {k: v for k, v in doc.get("model", {}).items() if k in ("weights_sha256", "fingerprint")}
        source = f"lock {os.fspath(lock)}" if not isinstance(lock, Mapping) else "lock"
    if not pinned and expected_sha256 is None:
        findings.skipped("weights_corrupted", "no lock or expected SHA-256 given to compare against")
        return
    hashed = "weights_sha256" in pinned or expected_sha256 is not None
    actual = {"weights_sha256": _file_hash(weights_file) if hashed else None, "fingerprint": fingerprint}
    evidence: dict[str, Any] = {"source": source, "weights_file": str(weights_file) if weights_file else None,
                                "expected_sha256": expected_sha256 or pinned.get("weights_sha256"),
                                "actual_sha256": actual["weights_sha256"],
                                "expected_fingerprint": pinned.get("fingerprint"), "actual_fingerprint": fingerprint}
    if hashed and actual["weights_sha256"] is None:
        evidence["note"] = "no weights file to hash (pass weights_file=...); compared the fingerprint only"
    mismatches = _lock_mismatches(pinned, actual)
    file_sha = actual["weights_sha256"]
    if expected_sha256 is not None and file_sha is not None and not sha256_matches(file_sha, expected_sha256):
        mismatches.append({"what": "weights_sha256", "expected": expected_sha256, "actual": file_sha})
    if not mismatches:
        findings.ok("weights_corrupted", f"weights match the {source}")
        return
    evidence["mismatches"] = mismatches
    findings.add(Cause(
        "weights_corrupted", None, "problem",
        f"the weights differ from the {source} ({', '.join(m['what'] for m in mismatches)} mismatch): these are "
        "not the pinned weights, so no result from them can be trusted",
        evidence, FIX_CORRUPTED,
    ))


def _lock_mismatches(pinned: Mapping[str, Any], actual: Mapping[str, str | None]) -> list[dict[str, Any]]:
    """Each pinned field the lock check refuses, one field at a time so that every mismatch is reported."""
    from steadyclip.errors import LockMismatchError
    from steadyclip.model.lockfile import compare_lock

    out: list[dict[str, Any]] = []
    for name, expected in pinned.items():
        if actual[name] is None:
            continue  # nothing to compare with (no weights file): said in the evidence
        try:
            compare_lock({"model": {name: expected}}, {name: actual[name]})
        except LockMismatchError as e:
            out.append({"what": e.field, "expected": e.expected, "actual": e.actual})
    return out


def check_non_finite(findings: Findings, *, state: Mapping[str, torch.Tensor], params: set[str],
                     outputs: Mapping[str, list[np.ndarray]]) -> None:
    """``non_finite``: NaN/Inf in any parameter, NaN/+Inf in a buffer, or non-finite probabilities.

    Buffers may hold -inf on purpose (the text tower's causal attention mask), so only
    NaN and +inf count there.
    """
    bad_weights: dict[str, int] = {}
    for name, t in state.items():
        if t.is_floating_point():
            bad = ~torch.isfinite(t) if name in params else (torch.isnan(t) | (t == float("inf")))
            n = int(bad.sum())
            if n:
                bad_weights[name] = n
    bad_outputs = {k: int(sum((~np.isfinite(a)).sum() for a in arrs)) for k, arrs in outputs.items()}
    bad_outputs = {k: v for k, v in bad_outputs.items() if v}
    if not bad_weights and not bad_outputs:
        findings.ok("non_finite", "every weight, buffer and probability is finite")
        return
    parts = []
    if bad_weights:
        parts.append(f"{len(bad_weights)} weight tensor(s) hold NaN/Inf")
    if bad_outputs:
        parts.append("non-finite probabilities in " + ", ".join(sorted(bad_outputs)))
    findings.add(Cause(
        "non_finite", None, "problem", "; ".join(parts),
        {"weights": dict(sorted(bad_weights.items())[:_LIST]), "weights_count": len(bad_weights),
         "outputs": bad_outputs},
        FIX_NON_FINITE,
    ))
