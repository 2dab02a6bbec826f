"""The micro-batcher on its own, with a fake engine: gathering, dispatch, cancellation, failure."""
from __future__ import annotations

import functools
import threading
import time
from concurrent.futures import Future

import numpy as np
import pytest
import torch

from steadyclip.errors import InputError
from steadyclip.server.batcher import Batcher, Overloaded


class FakeEngine:
    """Embeds each row as its pixel sum (so a wrong dispatch is visible); records batch sizes."""

    def __init__(self, delay: float = 0.0, fail: bool = False) -> None:
        self.calls: list[int] = []
        self.threads: set[str] = set()
        self.delay = delay
        self.fail = fail

    def embed_pixels(self, pixels: torch.Tensor) -> np.ndarray:
        self.threads.add(threading.current_thread().name)
        self.calls.append(int(pixels.shape[0]))
        time.sleep(self.delay)
        if self.fail:
            raise RuntimeError("boom")
        return pixels.flatten(1).sum(dim=1, keepdim=True).numpy().astype(np.float32)  # (n, 1)


def _px(value: float, n: int = 1) -> torch.Tensor:
    return torch.full((n, 3, 2, 2), value)


def test_concurrent_jobs_share_one_forward_and_get_their_own_rows() -> None:
    engine = FakeEngine()
    b = Batcher(engine, max_rows=8, max_wait_s=0.2)
    b.start()
    try:
        futs = [b.submit_pixels(_px(float(i), n=1 + i % 2)) for i in range(5)]  # 7 rows in all
        out = [f.result(10) for f in futs]
    finally:
        b.stop()
    assert engine.calls == [7]
    for i, rows in enumerate(out):
        assert rows.shape == (1 + i % 2, 1) and (rows == 12.0 * i).all()
    assert engine.threads == {"steadyclip-engine"}
    assert b.stats.to_dict()["largest_batch"] == 7


def test_batch_stops_gathering_at_max_rows() -> None:
    engine = FakeEngine(delay=0.05)
    b = Batcher(engine, max_rows=4, max_wait_s=0.2)
    b.start()
    try:
        futs = [b.submit_pixels(_px(1.0, 2)) for _ in range(4)]
        for f in futs:
            f.result(10)
    finally:
        b.stop()
    assert engine.calls == [4, 4]


def test_calls_run_on_the_engine_thread_in_order() -> None:
    b = Batcher(FakeEngine(), max_rows=8, max_wait_s=0.0)
    b.start()
    try:
        seen: list[tuple[int, str]] = []

        def record(i: int) -> None:
            seen.append((i, threading.current_thread().name))

        futs = [b.submit_call(functools.partial(record, i)) for i in range(3)]
        for f in futs:
            f.result(10)
    finally:
        b.stop()
    assert seen == [(0, "steadyclip-engine"), (1, "steadyclip-engine"), (2, "steadyclip-engine")]


def test_cancelled_jobs_are_skipped_and_failures_reach_every_waiter() -> None:
    engine = FakeEngine(delay=0.2)
    b = Batcher(engine, max_rows=1, max_wait_s=0.0)
    b.start()
    try:
        first = b.submit_pixels(_px(1.0))
        second = b.submit_pixels(_px(2.0))
        assert second.cancel()  # still queued behind `first`: never computed
        first.result(10)
    finally:
        b.stop()
    assert engine.calls == [1] and b.stats.cancelled == 1

    failing = Batcher(FakeEngine(fail=True), max_rows=8, max_wait_s=0.1)
    failing.start()
    try:
        futs: list[Future[np.ndarray]] = [failing.submit_pixels(_px(1.0)) for _ in range(3)]
        for f in futs:
            with pytest.raises(RuntimeError, match="boom"):
                f.result(10)
    finally:
        failing.stop()


def test_full_queue_and_stopped_worker_are_refused() -> None:
    b = Batcher(FakeEngine(delay=0.3), max_rows=1, max_wait_s=0.0, max_queue=1)
    with pytest.raises(RuntimeError, match="not running"):
        b.submit_pixels(_px(1.0))
    b.start()
    try:
        b.submit_pixels(_px(1.0))
        time.sleep(0.05)  # the worker takes the first job
        b.submit_pixels(_px(1.0))
        with pytest.raises(Overloaded):
            b.submit_pixels(_px(1.0))
    finally:
        b.stop()
    with pytest.raises(InputError, match="max_rows"):
        Batcher(FakeEngine(), max_rows=0)
