"""Build a model without drawing the random initial weights a full checkpoint overwrites anyway.

open_clip initialises every parameter with random draws (``kaiming_uniform_`` for each
Linear, ``xavier_uniform_`` for attention, ``normal_`` for embeddings): about a second
for ViT-B-32 on one core, spent on numbers that the checkpoint then replaces. Inside
:func:`skip_parameter_init`, a random fill whose target is an ``nn.Parameter`` returns
the tensor untouched (its memory is whatever ``torch.empty`` gave). Everything else
runs as usual: buffers (causal masks, position ids), temporaries, and any random draw
that does not fill a parameter.

This is only sound when *every* skipped parameter is then loaded from the checkpoint,
so the loader uses it for full loads only and checks with :func:`not_loaded` that no
skipped parameter was left out; a partial load (``allow_partial``) builds normally, so
its missing keys keep real initial values as documented.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Collection, Iterator
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["not_loaded", "skip_parameter_init"]

_INIT = torch.nn.init
_RANDOM_FILLS: frozenset[Callable[..., Any]] = frozenset({
    torch.Tensor.uniform_, torch.Tensor.normal_, torch.Tensor.random_, torch.Tensor.bernoulli_,
    _INIT.uniform_, _INIT.normal_, _INIT.trunc_normal_, _INIT.kaiming_uniform_, _INIT.kaiming_normal_,
    _INIT.xavier_uniform_, _INIT.xavier_normal_, _INIT.orthogonal_, _INIT.sparse_,
})


class _SkipParameterFills(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.skipped: list[torch.nn.Parameter] = []

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        if func in _RANDOM_FILLS:
            target = args[0] if args else kwargs.get("tensor", kwargs.get("self"))
            if isinstance(target, torch.nn.Parameter):
                self.skipped.append(target)
                return target
        return func(*args, **kwargs)


@contextlib.contextmanager
def skip_parameter_init() -> Iterator[list[torch.nn.Parameter]]:
    """Random fills of parameters are skipped inside; yields the list of parameters skipped."""
    mode = _SkipParameterFills()
    with mode:
        yield mode.skipped


def not_loaded(model: torch.nn.Module, skipped: Collection[torch.nn.Parameter], loaded: Collection[str]) -> list[str]:
    """Names of skipped parameters whose values did not come from the checkpoint keys ``loaded``.

    A tied parameter (one tensor under several names) counts as loaded when any of its names is.
    """
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    loaded_set = set(loaded)
    return sorted(n for p in {id(p): p for p in skipped}.values() for n in names.get(id(p), [])[:1]
                  if not loaded_set.intersection(names.get(id(p), [])))
