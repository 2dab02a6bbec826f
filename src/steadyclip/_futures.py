"""Small combinators over ``concurrent.futures.Future`` (replica tasks, the server's micro-batches)."""
from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any, TypeVar

import numpy as np

T = TypeVar("T")
U = TypeVar("U")

__all__ = ["completed", "joined_rows", "mapped"]


def completed(fn: Callable[..., T], *args: Any) -> Future[T]:
    """Run ``fn(*args)`` now; its result or its error as a finished future."""
    fut: Future[T] = Future()
    try:
        fut.set_result(fn(*args))
    except BaseException as e:  # noqa: BLE001 - delivered to the waiter through the future
        fut.set_exception(e)
    return fut


def mapped(fut: Future[T], fn: Callable[[T], U]) -> Future[U]:
    """A future of ``fn(result)``; an error of ``fut`` (or of ``fn``) passes through."""
    out: Future[U] = Future()

    def done(f: Future[T]) -> None:
        err = f.exception()
        if err is not None:
            out.set_exception(err)
            return
        try:
            out.set_result(fn(f.result()))
        except BaseException as e:  # noqa: BLE001
            out.set_exception(e)

    fut.add_done_callback(done)
    return out


def joined_rows(parts: Sequence[Future[np.ndarray]]) -> Future[np.ndarray]:
    """One future of the parts' rows concatenated in order; the first error fails it."""
    out: Future[np.ndarray] = Future()
    if not parts:
        out.set_result(np.zeros((0, 0), dtype=np.float32))
        return out
    lock = threading.Lock()
    left = [len(parts)]

    def done(f: Future[np.ndarray]) -> None:
        err = f.exception()
        with lock:
            if out.done():
                return
            if err is not None:
                out.set_exception(err)
                return
            left[0] -= 1
            if left[0]:
                return
        try:
            out.set_result(np.concatenate([p.result() for p in parts], axis=0))
        except BaseException as e:  # noqa: BLE001
            out.set_exception(e)

    for p in parts:
        p.add_done_callback(done)
    return out
