"""The fast profile's provenance record: its cast, drift from strict, and the thread verdict. Internal.

Measured on the forward cores (this process, never the replicas): the behaviour probe runs
through the fast core and through a strict twin on the same loaded model and shapes, and
:func:`steadyclip.numerics.drift.compare` turns the two into figures, remembered on disk per
model and stack.
"""
from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from steadyclip._util.cachedir import VerdictStore
from steadyclip._util.digest import sha256_json
from steadyclip.engine._core import ForwardCore
from steadyclip.engine.layout import usable_cpus
from steadyclip.engine.probe_inputs import PROBE_TEXTS, probe_images
from steadyclip.numerics.drift import DRIFT_VERSION, DriftFigures, compare
from steadyclip.numerics.head import ZeroShotHead

_logger = logging.getLogger(__name__)

__all__ = ["fast_record"]


def fast_record(fast: ForwardCore) -> dict[str, Any]:
    """``Provenance.reduced_precision`` of a fast core: the cast, the CPU's bf16 support, drift, threads."""
    if fast.cast is None:
        raise ValueError("fast_record is for cores running a reduced-precision copy")
    strict = ForwardCore(fast.loaded, fast.settings.replace(profile="strict", onednn=None, replicas=1,
                                                            allow_emulated_bf16=False))
    pinned = fast.threads
    other = pinned + 1 if pinned < usable_cpus() else pinned - 1
    threads = {**fast.check_threads((pinned, max(other, 1))).to_dict(), "pinned": pinned}
    return {**fast.cast.record, "drift_vs_strict": core_drift(fast, strict).to_dict(), "threads": threads}


def _probe_rows(core: ForwardCore) -> tuple[np.ndarray, np.ndarray]:
    pixels = torch.stack([core.preprocess(im) for im in probe_images(core.loaded.info.preprocess.size)])  # (6,3,H,W)
    tokens: torch.Tensor = core.loaded.tokenizer(list(PROBE_TEXTS))
    return core.embed_local("image", pixels), core.embed_local("text", tokens)


def core_drift(fast: ForwardCore, strict: ForwardCore) -> DriftFigures:
    """The behaviour probe under both profiles -> drift figures; measured once per model and stack."""
    key = sha256_json([DRIFT_VERSION, fast.numerics_basis(), strict.numerics_basis(), fast.size("image"),
                       fast.size("text")])
    store = VerdictStore("precision-drift")
    remembered = store.get(key)
    if isinstance(remembered, dict):
        try:
            return DriftFigures.from_dict(remembered)
        except TypeError:
            _logger.info("ignoring an unreadable remembered drift entry; measuring again")
    (ref_img, ref_txt), (img, txt) = _probe_rows(strict), _probe_rows(fast)
    figures = compare(ref_img, ref_txt, img, txt, head=ZeroShotHead.from_model(fast.loaded.model))
    _logger.info("fast vs strict drift on the probe: min cosine %.6f, max |dp| %.3g, top-1 agreement %.3f",
                 figures.min_cosine, figures.max_abs_prob, figures.top1_agreement)
    store.put(key, figures.to_dict())
    return figures
