"""Leave the user's model exactly as we found it.

``diagnose`` runs the user's model the way their code does - in train mode,
updating BatchNorm statistics - and then has to put everything back: each
module's ``training`` flag, every parameter and buffer (bitwise; only tensors
that changed are written, so parameters keep their storage and in-place version
counters) and ``requires_grad``. A state fingerprint taken before and after
proves it. The process's torch flags, thread count and RNG state are saved and
restored by :func:`steadyclip.numerics.determinism.snapshot` / :func:`~steadyclip.numerics.determinism.restore`.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from steadyclip.errors import IntegrityError

_logger = logging.getLogger(__name__)

__all__ = [
    "ModelSnapshot",
    "bitwise_equal",
    "changed_tensors",
    "cuda_initialized",
    "eval_temporarily",
    "strict_numerics",
]


def _named_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer (persistent or not), by name, without de-duplicating tied ones."""
    out: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        out[name] = p
    for name, b in model.named_buffers(remove_duplicate=False):
        if b is not None:
            out[name] = b
    return out


@dataclass
class ModelSnapshot:
    """Clones of a model's tensors plus its per-module mode and ``requires_grad`` flags."""

    tensors: dict[str, torch.Tensor]
    training: dict[str, bool]
    requires_grad: dict[str, bool]
    fingerprint: str

    @classmethod
    def take(cls, model: torch.nn.Module) -> ModelSnapshot:
        from steadyclip.model.integrity import state_fingerprint

        with torch.no_grad():
            tensors = {k: v.detach().clone() for k, v in _named_tensors(model).items()}
        return cls(
            tensors=tensors,
            training={name: m.training for name, m in model.named_modules(remove_duplicate=False)},
            requires_grad={name: p.requires_grad for name, p in model.named_parameters(remove_duplicate=False)},
            fingerprint=state_fingerprint(model),
        )

    def restore_tensors(self, model: torch.nn.Module) -> list[str]:
        """Write back only the tensors that differ; returns their names."""
        restored: list[str] = []
        with torch.no_grad():
            for name, t in _named_tensors(model).items():
                saved = self.tensors.get(name)
                if saved is None or saved.shape != t.shape or saved.dtype != t.dtype:
                    continue
                if not bitwise_equal(t, saved):
                    t.copy_(saved)
                    restored.append(name)
        return restored

    def restore(self, model: torch.nn.Module) -> list[str]:
        """Restore tensors, modes and ``requires_grad``; verify with the state fingerprint.

        Raises:
            IntegrityError: the model could not be restored to its exact earlier state.
        """
        from steadyclip.model.integrity import state_fingerprint

        restored = self.restore_tensors(model)
        for name, m in model.named_modules(remove_duplicate=False):
            if name in self.training:
                m.training = self.training[name]
        for name, p in model.named_parameters(remove_duplicate=False):
            if name in self.requires_grad and p.requires_grad != self.requires_grad[name]:
                p.requires_grad_(self.requires_grad[name])
        if restored:
            _logger.debug("restored %d tensor(s) the diagnosis changed: %s", len(restored), restored[:5])
        after = state_fingerprint(model)
        if after != self.fingerprint:
            raise IntegrityError(
                f"steadyclip doctor could not restore the model's state (fingerprint {self.fingerprint[:16]} "
                f"before, {after[:16]} after). Reload the model before using it again, and report this bug."
            )
        return restored


def changed_tensors(model: torch.nn.Module, snapshot: ModelSnapshot) -> dict[str, float]:
    """Tensors that differ from the snapshot, with the max absolute change of each (NaN-safe)."""
    out: dict[str, float] = {}
    with torch.no_grad():
        for name, t in _named_tensors(model).items():
            saved = snapshot.tensors.get(name)
            if saved is None or saved.shape != t.shape or saved.dtype != t.dtype or bitwise_equal(t, saved):
                continue
            diff = (t.detach().double() - saved.double()).abs()
            out[name] = float(torch.nan_to_num(diff, nan=float("inf")).max()) if diff.numel() else 0.0
    return out


def cuda_initialized() -> bool:
    """Whether this process has already started CUDA (asking does not start it)."""
    return bool(torch.cuda.is_initialized())  # type: ignore[no-untyped-call]


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    a, b = a.detach(), b.detach()
    if a.device != b.device:
        b = b.to(a.device)
    if a.is_floating_point() or a.is_complex():
        # NaN != NaN, so compare the bytes: an unchanged NaN weight is unchanged.
        return bool(torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8)))
    return bool(torch.equal(a, b))


@contextlib.contextmanager
def eval_temporarily(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """``model.eval()`` for the duration; each module's own ``training`` flag comes back on exit."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, was in modes:
            m.training = was


@contextlib.contextmanager
def strict_numerics(device_type: str, threads: int) -> Iterator[dict[str, Any]]:
    """steadyclip's strict profile (fp32, deterministic flags) at a given thread count; restored on exit."""
    from steadyclip.numerics import determinism

    profile = determinism.get_profile("strict", device=device_type)
    with determinism.applied(profile, device_type, threads=threads) as flags:
        yield dict(flags)
