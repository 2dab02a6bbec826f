"""The micro-batcher on its own, with a fake engine: gathering, dispatch, cancellation, failure."""
from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable
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


def test_calls_run_on_the_call_thread_in_order() -> None:
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
    assert seen == [(0, "steadyclip-engine-calls"), (1, "steadyclip-engine-calls"), (2, "steadyclip-engine-calls")]


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


class AsyncEngine(FakeEngine):
    """Like a replicated engine: ``submit_pixels`` returns at once, rows arrive later from other threads."""

    def __init__(self, delay: float) -> None:
        super().__init__(delay=delay)
        self.running = 0
        self.most_running = 0
        self._lock = threading.Lock()

    def submit_pixels(self, pixels: torch.Tensor) -> Future[np.ndarray]:
        fut: Future[np.ndarray] = Future()

        def work() -> None:
            with self._lock:
                self.running += 1
                self.most_running = max(self.most_running, self.running)
            try:
                fut.set_result(self.embed_pixels(pixels))
            finally:
                with self._lock:
                    self.running -= 1

        threading.Thread(target=work).start()
        return fut


def test_micro_batches_overlap_up_to_in_flight_and_calls_never_wait_behind_them() -> None:
    engine = AsyncEngine(delay=1.0)
    b = Batcher(engine, max_rows=2, max_wait_s=0.0, in_flight=2)
    b.start()
    try:
        futs = [b.submit_pixels(_px(float(i))) for i in range(6)]
        time.sleep(0.1)  # two micro-batches are now running
        assert b.submit_call(lambda: engine.running).result(10) == 2  # answered while both still run
        out = [f.result(10) for f in futs]
    finally:
        b.stop()
    assert engine.most_running == 2  # never more than in_flight
    assert sum(engine.calls) == 6 and max(engine.calls) <= 2
    assert [float(r[0, 0]) for r in out] == [12.0 * i for i in range(6)]  # every job got its own row


def test_under_load_a_micro_batch_waits_for_companions() -> None:
    """With a forward in flight, a lone job waits (up to a quarter of a forward) for its micro-batch to fill."""
    engine = AsyncEngine(delay=0.8)
    b = Batcher(engine, max_rows=4, max_wait_s=0.0, in_flight=2)
    b.start()
    try:
        b.submit_pixels(_px(1.0, 4)).result(10)  # measures a forward: 0.8 s
        busy = b.submit_pixels(_px(1.0, 4))  # runs for 0.8 s: the server is under load
        time.sleep(0.05)
        trickle = []
        for _ in range(4):  # one job every 30 ms, as requests arrive while clients decode
            trickle.append(b.submit_pixels(_px(2.0)))
            time.sleep(0.03)
        for f in [busy, *trickle]:
            f.result(10)
    finally:
        b.stop()
    assert engine.calls == [4, 4, 4]  # the trickle became one full micro-batch, not four padded ones


def test_a_lone_sequential_client_never_waits_for_companions() -> None:
    """The wait for companions depends on demand (rows in flight + just answered), not on being busy."""
    engine = AsyncEngine(delay=0.3)
    b = Batcher(engine, max_rows=4, max_wait_s=0.002, in_flight=2)
    b.start()
    try:
        b.submit_pixels(_px(1.0)).result(10)  # one client, one row: nobody else will come
        assert b.wait_s() == 0.002
        b.submit_pixels(_px(1.0, 4)).result(10)  # a full micro-batch was just answered: its clients return
        assert b.wait_s() > 0.05
    finally:
        b.stop()


def _texts_fn(delay: float, calls: list[list[str]]) -> Callable[[list[str]], Future[np.ndarray]]:
    def submit(texts: list[str]) -> Future[np.ndarray]:
        fut: Future[np.ndarray] = Future()

        def work() -> None:
            calls.append(list(texts))
            time.sleep(delay)
            fut.set_result(np.array([[float(len(t))] for t in texts], dtype=np.float32))  # (n, 1)

        threading.Thread(target=work).start()
        return fut

    return submit


def test_texts_from_concurrent_requests_share_micro_batches_and_get_their_own_rows() -> None:
    calls: list[list[str]] = []
    b = Batcher(FakeEngine(), max_rows=8, max_wait_s=0.05, in_flight=1, texts_fn=_texts_fn(0.0, calls))
    b.start()
    try:
        futs = [b.submit_texts(["a" * (i + 1), "bb"]) for i in range(4)]  # 8 rows from 4 requests
        rows = [f.result(10) for f in futs]
    finally:
        b.stop()
    assert [r[:, 0].tolist() for r in rows] == [[i + 1.0, 2.0] for i in range(4)]
    assert len(calls) == 1 and len(calls[0]) == 8  # one micro-batch of 8 texts
    with pytest.raises(InputError, match="texts_fn"):
        Batcher(FakeEngine(), max_rows=8).submit_texts(["a"])


def test_work_that_would_wait_past_the_timeout_is_refused_at_once_with_a_retry_after() -> None:
    calls: list[list[str]] = []
    b = Batcher(FakeEngine(), max_rows=2, max_wait_s=0.0, in_flight=1, texts_fn=_texts_fn(0.3, calls),
                timeout_s=1.0)
    b.start()
    try:
        b.submit_texts(["a", "b"]).result(10)  # measures the pace: ~0.3 s per micro-batch
        accepted, refused = [], []
        for _ in range(10):  # 20 rows at 2 per 0.3 s is ~3 s of work: past the 1 s timeout
            try:
                accepted.append(b.submit_texts(["a", "b"]))
            except Overloaded as e:
                refused.append(e)
        assert accepted and refused
        assert all(e.retry_after_s >= 1.0 and "request timeout" in str(e) for e in refused)
        t0 = time.monotonic()
        for f in accepted:
            f.result(10)
        assert time.monotonic() - t0 <= 1.0 + 1.0  # what was accepted was answered about within the timeout
    finally:
        b.stop()


def test_while_a_replica_idles_a_text_micro_batch_takes_half_so_both_replicas_work() -> None:
    calls: list[list[str]] = []
    b = Batcher(FakeEngine(), max_rows=8, max_wait_s=0.05, in_flight=2, texts_fn=_texts_fn(0.3, calls),
                text_rows=32)
    b.start()
    try:
        t0 = time.monotonic()
        futs = [b.submit_texts([f"t{i}"] * 8) for i in range(4)]  # 32 texts within the 50 ms wait
        for f in futs:
            f.result(10)
        took = time.monotonic() - t0
    finally:
        b.stop()
    assert [len(c) for c in calls] == [16, 16]  # not one micro-batch of all 32 on one replica
    assert took < 0.55  # the two ran at once (0.3 s each), not one after the other
