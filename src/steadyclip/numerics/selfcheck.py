"""The engine's start-up self-checks and their remembered verdicts (JSON maps in the cache dir).

The questions, each answered once per model, profile, stack and shape, then remembered:
- **batch path** (:func:`batch_path`): are single-row forwards bitwise equal to the rows of
  a full micro-batch? If so, tails run row by row (``"verified-invariant"``), else padded to
  the fixed shape (``"fixed-shape"``).
- **text rows** (:func:`text_rows`): at one text bucket, do forwards of more rows give every row
  bitwise equal to forwards of the base rows? Only the sizes that do are ever used.
- **threads** (:func:`thread_check`): are rows at one intra-op thread count bitwise equal to
  rows at another? The engine runs T > 1 threads only where rows at T equal rows at 1; the
  fast profile records the same verdict for its pinned count. Thread invariance is a property
  of model x precision x machine (ViT-B-32 fp32 yes, RN50 no, on one Xeon): measured, never assumed.

The callers (the engine's forward core) pass the tower functions and probe inputs, so this
module knows nothing about engines.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch

from steadyclip._util.cachedir import VerdictStore
from steadyclip._util.digest import sha256_json
from steadyclip.numerics import determinism
from steadyclip.numerics.profiles import Profile

_logger = logging.getLogger(__name__)

__all__ = ["ThreadCheck", "batch_path", "rows_equal_single", "rows_equal_threads", "run_chunk", "text_rows",
           "thread_check"]

Forward = Callable[[torch.Tensor], torch.Tensor]
ThreadVerdict = Literal["thread-invariant", "thread-dependent", "not-applicable", "not-checked"]
_THREAD_STORE = "thread-selfcheck"
_BATCH_STORE = "batch-selfcheck"
_TEXT_ROWS_STORE = "text-rows-selfcheck"


def _run(fn: Forward, x: torch.Tensor, profile: Profile, device: str, threads: int) -> np.ndarray:
    with determinism.applied(profile, device, threads=threads), torch.inference_mode(), \
            determinism.autocast(profile, device):
        out: np.ndarray = fn(x).float().cpu().numpy()
    return out


def rows_equal_single(fn: Forward, probe: torch.Tensor, profile: Profile, device: str, threads: int = 1) -> bool:
    """Are single-row forwards of the first and last probe rows bitwise equal to the full batch's rows?"""
    full = _run(fn, probe, profile, device, threads)
    rows = [0, probe.shape[0] - 1]
    return all(np.array_equal(full[i], _run(fn, probe[i : i + 1], profile, device, threads)[0]) for i in rows)


def rows_equal_threads(fn: Forward, probe: torch.Tensor, profile: Profile, device: str, threads: int,
                       baseline: int = 1) -> bool:
    """Are the probe's rows at ``threads`` intra-op threads bitwise equal to its rows at ``baseline``?"""
    base = _run(fn, probe, profile, device, baseline)
    other = _run(fn, probe, profile, device, threads)
    return bool(np.array_equal(base, other))


@dataclasses.dataclass(frozen=True)
class ThreadCheck:
    """Whether rows depend on the intra-op thread count, for one model, profile and stack.

    ``verdict``: ``"thread-invariant"`` (rows at both counts bitwise equal), ``"thread-dependent"``,
    ``"not-applicable"`` (not a CPU run, or one CPU: ``why`` says), ``"not-checked"`` (nothing asked
    for more than one thread, so nothing was measured; rows run at 1).
    """

    verdict: ThreadVerdict
    compared: tuple[int, ...]
    why: str = ""

    @property
    def invariant(self) -> bool:
        return self.verdict == "thread-invariant"

    def to_dict(self) -> dict[str, Any]:
        return {"verdict": self.verdict, "compared": list(self.compared), **({"why": self.why} if self.why else {})}


def thread_check(towers: Mapping[str, tuple[Forward, torch.Tensor]], profile: Profile, device: str, basis: str,
                 compared: tuple[int, int]) -> ThreadCheck:
    """Rows of every tower (``kind -> (forward, probe)``) at the two thread counts: equal? Remembered.

    ``basis`` is the numerics key of the weights and stack (:func:`steadyclip.numerics.identity.numerics_key`);
    the key adds the thread pair and the probe shapes, so one store answers the engine and the fast
    profile alike.
    """
    a, b = sorted(compared)
    if device != "cpu":
        return ThreadCheck("not-applicable", (a, b), "not a CPU run: the device decides its own threads")
    if a == b:
        return ThreadCheck("not-applicable", (a,), "only one CPU to compare on")
    shapes = {kind: list(probe.shape) for kind, (_, probe) in sorted(towers.items())}
    key = sha256_json(["threads", basis, [a, b], shapes])
    store = VerdictStore(_THREAD_STORE)
    remembered = store.get(key)
    if remembered in ("thread-invariant", "thread-dependent"):
        return ThreadCheck(remembered, (a, b))
    same = all(rows_equal_threads(fn, probe, profile, device, b, baseline=a) for fn, probe in towers.values())
    verdict: ThreadVerdict = "thread-invariant" if same else "thread-dependent"
    _logger.info("rows at %d vs %d threads: %s", a, b, verdict)
    store.put(key, verdict)
    return ThreadCheck(verdict, (a, b))


def batch_path(fn: Forward, probe: torch.Tensor, profile: Profile, device: str, basis: str, *, kind: str,
               fixed: bool = False) -> str:
    """``"verified-invariant"`` or ``"fixed-shape"`` for one tower at the probe's shape, remembered on disk.

    The key names everything the verdict depends on (weights, code versions, numerics flags,
    CPU, shape), so a warm start does not pay for the check again. ``fixed`` (or a micro-batch
    of 1) skips the check: always the fixed shape.
    """
    size = probe.shape[0]
    if size == 1 or fixed:
        path = "fixed-shape"
    else:
        key = sha256_json(["batch-path", basis, kind, size])
        store = VerdictStore(_BATCH_STORE)
        remembered = store.get(key)
        if remembered in ("fixed-shape", "verified-invariant"):
            path = remembered
        else:
            path = "verified-invariant" if rows_equal_single(fn, probe, profile, device) else "fixed-shape"
            store.put(key, path)
    _logger.info("%s tower batch path: %s (micro-batch %d)", kind, path, size)
    return path


def text_rows(fn: Forward, probe: torch.Tensor, sizes: Sequence[int], profile: Profile, device: str, basis: str,
              threads: int) -> tuple[int, ...]:
    """The row counts of ``sizes`` (ascending; the first is the base) whose forwards of ``fn`` give every
    row bitwise equal to the same rows in forwards of the base size, remembered on disk.

    ``probe`` holds ``sizes[-1]`` rows of one shape. The key names the weights and stack (``basis``),
    the row shape, the sizes and the thread count, so the verdict is measured once per machine.
    """
    base = sizes[0]
    if len(sizes) == 1:
        return (base,)
    key = sha256_json(["text-rows", basis, list(probe.shape[1:]), list(sizes), threads])
    store = VerdictStore(_TEXT_ROWS_STORE)
    remembered = store.get(key)
    if isinstance(remembered, list) and remembered and remembered[0] == base and set(remembered) <= set(sizes):
        return tuple(int(z) for z in remembered)  # (an entry naming other sizes is measured again)
    ref = np.concatenate([_run(fn, probe[s : s + base], profile, device, threads)
                          for s in range(0, sizes[-1], base)], axis=0)
    proven = (base, *(z for z in sizes[1:] if np.array_equal(_run(fn, probe[:z], profile, device, threads), ref[:z])))
    _logger.info("text rows at %s: forwards of %s rows equal the %d-row ones", list(probe.shape[1:]), list(proven), base)
    store.put(key, list(proven))
    return proven


def run_chunk(fn: Forward, chunk: torch.Tensor, size: int, path: str) -> np.ndarray:
    """One micro-batch of ``chunk`` at the fixed shape ``size``: padded, or row by row where proven equal."""
    n = chunk.shape[0]
    if n == size:
        out: np.ndarray = fn(chunk).float().cpu().numpy()
        return out
    if path == "verified-invariant":
        return np.concatenate([fn(chunk[i : i + 1]).float().cpu().numpy() for i in range(n)], axis=0)
    pad = torch.zeros((size - n, *chunk.shape[1:]), dtype=chunk.dtype, device=chunk.device)
    padded: np.ndarray = fn(torch.cat([chunk, pad], dim=0)).float().cpu().numpy()
    return padded[:n]  # (size, D) -> (n, D)
