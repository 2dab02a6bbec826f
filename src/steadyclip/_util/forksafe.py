"""A re-entrant lock that a forked child (an engine replica) gets fresh.

Only the forking thread survives a fork: a lock another thread held at that moment
would stay held forever in the child. Module-level locks that replicas may take
(the numeric-flags lock, the decoder-warnings lock) use this instead of ``RLock``.
"""
from __future__ import annotations

import os
import threading
import weakref

__all__ = ["ForkSafeRLock"]

_LIVE: weakref.WeakSet[ForkSafeRLock] = weakref.WeakSet()


class ForkSafeRLock:
    """``threading.RLock`` semantics (``with lock:``); replaced by an unheld one in a forked child."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        _LIVE.add(self)

    def __enter__(self) -> bool:
        return self._lock.acquire()

    def __exit__(self, *exc: object) -> None:
        self._lock.release()

    def _renew(self) -> None:
        self._lock = threading.RLock()


def _after_fork_in_child() -> None:
    for lock in list(_LIVE):
        lock._renew()


os.register_at_fork(after_in_child=_after_fork_in_child)
