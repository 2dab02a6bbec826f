"""Small combinators over ``concurrent.futures.Future`` (replica tasks, the server's micro-batches)."""
from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any, TypeVar

import numpy as np

T = TypeVar("T")
U = TypeVar("U")

__all__ = ["completed", "joined", "joined_lists", "joined_rows", "mapped", "relay"]


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


def relay(src: Future[T], dst: Future[T]) -> None:
    """When ``src`` finishes, ``dst`` gets its result or its error."""

    def done(f: Future[T]) -> None:
        err = f.exception()
        if err is not None:
            dst.set_exception(err)
        else:
            dst.set_result(f.result())

    src.add_done_callback(done)


def joined(parts: Sequence[Future[T]], combine: Callable[[list[T]], U], empty: U) -> Future[U]:
    """One future of ``combine([results in order])``; the first error fails it (``empty`` if no parts)."""
    out: Future[U] = Future()
    if not parts:
        out.set_result(empty)
        return out
    lock = threading.Lock()
    left = [len(parts)]

    def done(f: Future[T]) -> None:
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
            out.set_result(combine([p.result() for p in parts]))
        except BaseException as e:  # noqa: BLE001
            out.set_exception(e)

    for p in parts:
        p.add_done_callback(done)
    return out


def joined_rows(parts: Sequence[Future[np.ndarray]]) -> Future[np.ndarray]:
    """One future of the parts' (n_i, D) rows concatenated in order."""
    return joined(parts, lambda arrays: np.concatenate(arrays, axis=0), np.zeros((0, 0), dtype=np.float32))


def joined_lists(parts: Sequence[Future[list[T]]]) -> Future[list[T]]:
    """One future of the parts' lists concatenated in order."""
    return joined(parts, lambda lists: [x for part in lists for x in part], [])
