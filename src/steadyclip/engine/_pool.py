"""K engine replicas in worker processes: every core busy, the same bits as one process.

Why processes, not threads: a row's bits depend on the intra-op thread count and the
micro-batch shape. K processes that each run the same kernels at the same pinned
thread count on the same fixed shape compute every row exactly as one process
would, whatever K is: identity by construction, not by luck.

How they start: once, the pool forks a *zygote* from the caller (which already
holds the loaded, verified model). The zygote is single-threaded and does nothing
but fork replicas on request, so a replica is never forked from a process that
has other threads running (a server's event loop, a batch job's writer), and a
replica that dies is replaced by a fresh copy of the same memory. Weights are
shared copy-on-write: an extra replica costs its activations and heap, not the
weights.

What happens when one dies (OOM killer, kill -9, a codec crash): the pool notices
(end of file on its socket), forks a replacement and runs the task again once.
A task that kills a second replica fails with :class:`ReplicaCrashError`, so the
caller can find the culprit (the batch runner retries item by item and makes the
one bad file an error row). Nothing is lost or done twice: a task's result is
taken from exactly one replica.

Tasks are ``(fn, args)`` with ``fn`` a module-level function; a replica runs
``fn(state, *args)`` on *its* copy of the state object given to the pool (an
:class:`~steadyclip.engine._core.ForwardCore`). Arguments and results travel pickled over a
Unix socket: send NumPy arrays, not tensors.
"""
from __future__ import annotations

import collections
import gc
import itertools
import logging
import multiprocessing
import os
import pickle
import signal
import socket
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from multiprocessing.reduction import recv_handle, send_handle
from typing import Any

from steadyclip import errors
from steadyclip.engine import errmap
from steadyclip.errors import ReplicaCrashError, SteadyClipError

_logger = logging.getLogger(__name__)

__all__ = ["ReplicaPool"]

RETRIES = 1  # a task is run again once on a fresh replica before it is declared a crasher


@dataclass
class _Task:
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    future: Future[Any] = field(default_factory=Future)
    id: int = 0
    attempts: int = 0


@dataclass
class _Worker:
    pid: int
    conn: Connection
    task: _Task | None = None


class ReplicaPool:
    """``replicas`` forked copies of ``state`` running submitted tasks; replaced when they die.

    Args:
        state: the object each replica passes to tasks as their first argument.
        replicas: how many worker processes.
        init: run once in each new replica before its first task (e.g. pin threads).
    """

    def __init__(self, state: Any, replicas: int, *, init: Callable[[Any], None] | None = None) -> None:
        if replicas < 1:
            raise errors.InputError(f"replicas must be >= 1, got {replicas}")
        if "fork" not in multiprocessing.get_all_start_methods():
            raise errors.DeviceError("engine replicas need the 'fork' start method (Linux, macOS); "
                                     "use replicas=1 on this platform")
        self.replicas = replicas
        self.restarts = 0
        self._ids = itertools.count()
        self._pending: collections.deque[_Task] = collections.deque()
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()
        self._closed = False
        self._wake_r, self._wake_w = multiprocessing.Pipe(duplex=False)
        ctl_parent, ctl_child = multiprocessing.Pipe(duplex=True)
        # os.fork, not multiprocessing.Process: the zygote must hold no reference the pool keeps
        # (the state would never be freed), and only the forking thread survives in it.
        self._zygote_pid = os.fork()
        if self._zygote_pid == 0:  # the zygote
            code = 0
            try:
                ctl_parent.close()
                _zygote_main(ctl_child, state, init)
            except BaseException:  # noqa: BLE001 - never return into the caller's code in a fork
                code = 1
            os._exit(code)
        ctl_child.close()
        self._ctl = ctl_parent
        for _ in range(replicas):
            self._workers.append(self._spawn())
        self._thread = threading.Thread(target=self._loop, name="steadyclip-replicas", daemon=True)
        self._thread.start()
        self._finalizer = weakref.finalize(self, _shutdown, self._ctl, self._wake_w, list(self._workers))

    # ---- public --------------------------------------------------------------------------
    def submit(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        """Run ``fn(state, *args)`` in some replica; the future holds its result or its error."""
        task = _Task(fn, args, id=next(self._ids))
        with self._lock:
            if self._closed:
                raise errors.SteadyClipError("the replica pool is closed; create a new Engine")
            self._pending.append(task)
        self._wake_w.send_bytes(b"x")
        return task.future

    def pids(self) -> list[int]:
        """Process ids of the live replicas (for tests and operators)."""
        with self._lock:
            return [w.pid for w in self._workers]

    def close(self) -> None:
        """Stop the replicas and the zygote; pending tasks fail."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._wake_w.send_bytes(b"x")
        self._thread.join(timeout=10)
        self._finalizer()
        _reap(self._zygote_pid)

    # ---- spawning ------------------------------------------------------------------------
    def _spawn(self) -> _Worker:
        mine, theirs = socket.socketpair()
        try:
            self._ctl.send("spawn")
            send_handle(self._ctl, theirs.fileno(), self._zygote_pid)
            pid = self._ctl.recv()
        except (EOFError, OSError) as e:
            raise ReplicaCrashError(
                "the replica zygote process is gone (killed from outside?); no new replica can be started. "
                "Create a new Engine, or run with replicas=1") from e
        finally:
            theirs.close()
        return _Worker(pid=int(pid), conn=Connection(mine.detach()))

    # ---- the dispatcher thread ----------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._lock:
                closed = self._closed
            if closed:
                self._fail_all(errors.SteadyClipError("the replica pool was closed before this task ran"))
                return
            self._assign()
            conns: list[Any] = [w.conn for w in self._workers] + [self._wake_r]
            for ready in wait(conns, timeout=1.0):
                if ready is self._wake_r:
                    while self._wake_r.poll():
                        self._wake_r.recv_bytes()
                    continue
                worker = next((w for w in self._workers if w.conn is ready), None)
                if worker is not None:
                    self._receive(worker)

    def _assign(self) -> None:
        for worker in self._workers:
            with self._lock:
                if worker.task is not None or not self._pending:
                    continue
                task = self._pending.popleft()
            worker.task = task
            try:
                worker.conn.send((task.id, task.fn, task.args))
            except (OSError, ValueError):
                self._replace(worker)
            except Exception as e:  # noqa: BLE001 - an unpicklable argument belongs to that task alone
                worker.task = None
                task.future.set_exception(errors.InputError(f"a task could not be sent to a replica: {e}"))

    def _receive(self, worker: _Worker) -> None:
        try:
            task_id, status, value = worker.conn.recv()
        except (EOFError, OSError):
            self._replace(worker)
            return
        task, worker.task = worker.task, None
        if task is None or task.id != task_id:
            _logger.error("replica %d answered task %s it was not running; ignored", worker.pid, task_id)
            return
        if status == "ok":
            task.future.set_result(value)
        else:
            task.future.set_exception(errmap.from_replica(value))

    def _replace(self, worker: _Worker) -> None:
        """A replica died: start another, and run its task again (once)."""
        task = worker.task
        worker.conn.close()
        idx = self._workers.index(worker)
        self.restarts += 1
        _logger.warning("engine replica %d died; starting a replacement", worker.pid)
        try:
            self._workers[idx] = self._spawn()
        except ReplicaCrashError as e:
            self._workers.pop(idx)
            if task is not None:
                task.future.set_exception(e)
            if not self._workers:
                self._fail_all(e)
            return
        if task is None:
            return
        task.attempts += 1
        if task.attempts > RETRIES:
            task.future.set_exception(ReplicaCrashError(
                f"this task killed {task.attempts} engine replicas in a row (a crashing image decoder, or "
                "memory exhausted); run its inputs one at a time to find the culprit"))
        else:
            with self._lock:
                self._pending.appendleft(task)

    def _fail_all(self, error: SteadyClipError) -> None:
        with self._lock:
            tasks = list(self._pending) + [w.task for w in self._workers if w.task is not None]
            self._pending.clear()
            if not self._workers:
                self._closed = True
        for task in tasks:
            if not task.future.done():
                task.future.set_exception(error)


def _shutdown(ctl: Connection, wake: Connection, workers: list[_Worker]) -> None:
    for w in workers:
        try:
            w.conn.close()  # end of file: the replica leaves its loop
        except OSError:
            pass
    for c in (ctl, wake):
        try:
            c.close()  # the zygote leaves on end of file
        except OSError:
            pass


def _reap(pid: int) -> None:
    """Collect the zygote's exit status (it leaves on end of file), killing it after a grace period."""
    import time

    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return
        if done:
            return
        time.sleep(0.02)
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass


# ---- child processes ------------------------------------------------------------------------
def _zygote_main(ctl: Connection, state: Any, init: Callable[[Any], None] | None) -> None:
    """Fork a replica for every request; leave when the pool's end of the socket closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # replicas are reaped by the kernel
    # Hold none of the caller's files: an inherited lock (a batch job's flock), listening socket or
    # pipe would outlive the caller after a kill -9. The parent's Python objects that owned them are
    # frozen, so no collection in a child ever closes a descriptor number it reuses.
    gc.freeze()
    keep = ctl.fileno()
    os.closerange(3, keep)
    os.closerange(keep + 1, _max_fd())
    while True:
        try:
            ctl.recv()
            fd = recv_handle(ctl)
        except (EOFError, OSError):
            os._exit(0)
        pid = os.fork()
        if pid == 0:
            ctl.close()
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            code = 0
            try:
                _replica_main(Connection(fd), state, init)
            except BaseException:  # noqa: BLE001 - a replica never returns into the zygote's loop
                code = 1
            os._exit(code)
        os.close(fd)
        try:
            ctl.send(pid)
        except OSError:
            os._exit(0)


def _max_fd() -> int:
    try:
        return max(1024, int(os.sysconf("SC_OPEN_MAX")))
    except (ValueError, OSError):
        return 65536


def _replica_main(conn: Connection, state: Any, init: Callable[[Any], None] | None) -> None:
    if init is not None:
        init(state)
    while True:
        try:
            task_id, fn, args = conn.recv()
        except (EOFError, OSError):
            return
        try:
            reply: tuple[Any, str, Any] = (task_id, "ok", fn(state, *args))
        except Exception as e:  # noqa: BLE001 - every error goes back to the caller, typed
            reply = (task_id, "err", _portable_error(e))
        try:
            conn.send(reply)
        except (pickle.PicklingError, TypeError, AttributeError) as e:
            conn.send((task_id, "err", ("SteadyClipError", f"a replica's result could not be sent back: {e}")))
        except OSError:
            return


def _portable_error(e: Exception) -> Any:
    """The exception itself when it survives pickling, else its class name and message
    (:func:`steadyclip.engine.errmap.from_replica` makes it ours again on the caller's side)."""
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:  # noqa: BLE001 - custom constructors may not unpickle; keep name and text
        return (type(e).__name__, str(e))
