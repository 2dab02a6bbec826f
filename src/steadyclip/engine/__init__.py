"""The engine: a loaded model in, deterministic rows out.

Inside, bottom to top: ``_core`` (the forward core: towers, fixed shapes, state checks), the helpers
that take the core (``_replicas``/``_pool``: K forked replicas; ``_rows``: one outcome per input;
``precision``: the fast profile's cast; ``images``, ``prompts``, ``textcache``), then ``facade``:
:class:`Engine`, the one object users hold. Underscored modules are internal. Shared with the front
ends: ``outcome`` (one input's :class:`~steadyclip.engine.outcome.ImageOutcome` and the one decode
function, ``decode_input``) and ``errmap`` (where foreign and remote errors become ours).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from steadyclip.engine.facade import Engine

__all__ = ["Engine"]


def __getattr__(name: str) -> Any:
    # lazy: importing a light submodule (layout, prompts) must not start torch
    if name == "Engine":
        from steadyclip.engine.facade import Engine

        return Engine
    raise AttributeError(f"module 'steadyclip.engine' has no attribute {name!r}")
