"""A forward core whose forwards run in a worker process started with the portable variables. Internal.

``Engine(profile="portable")`` in a library user's process that loaded torch and numpy without
the portable variables (:data:`steadyclip.numerics.early.PORTABLE_ENV`) cannot compute portable
rows itself: its kernels were fixed at import. Rather than refuse, it starts one worker process
(``spawn``: a fresh interpreter, never a fork of this one) with the variables set, which loads the
same model again (same SHA-256 and fingerprint, or it refuses) and runs every forward, self-check
and the golden proof; this process keeps preprocessing, tokenizing and everything else. One worker
(threads inside it where the thread self-check proves them equal): replicas would be forks of this
process, with its kernels. Where the model cannot be loaded again from what it was loaded from (a
model object, not a source), :class:`~steadyclip.errors.PortableSetupError` says what to do.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import threading
from multiprocessing.connection import Connection
from typing import Any

from steadyclip.engine._core import ForwardCore
from steadyclip.engine.portable_proof import prove
from steadyclip.engine.settings import EngineSettings
from steadyclip.errors import IntegrityError, PortableSetupError, SteadyClipError
from steadyclip.model.loading import LoadedModel
from steadyclip.numerics.early import PORTABLE_ENV, portable_overlay
from steadyclip.numerics.selfcheck import ThreadCheck

__all__ = ["RemoteCore", "make_core", "portable_proof"]

_logger = logging.getLogger(__name__)
_RELOADABLE = ("bundled", "tag", "file", "hf-hub", "local-dir")


def _source(loaded: LoadedModel) -> tuple[str, str | None]:
    info = loaded.info
    if info.source not in _RELOADABLE:
        raise PortableSetupError(f"the portable profile needs the variables {PORTABLE_ENV} before torch loads, and "
                                 f"a model of source {info.source!r} cannot be loaded again in a worker process that "
                                 "has them; start your process with them set")
    if info.source in ("tag", "file"):
        return info.arch, info.pretrained
    model_id = info.model_id if info.revision is None or "@" in info.model_id else f"{info.model_id}@{info.revision}"
    return model_id, info.pretrained


def _serve(conn: Connection, source: str, pretrained: str | None, fingerprint: str, settings: dict[str, Any]) -> None:
    """The worker's loop: load, check it is the same model, then answer ``(method, args)`` calls."""
    try:
        from steadyclip.model.loading import load

        loaded = load(source, pretrained=pretrained)
        if loaded.info.fingerprint != fingerprint:
            raise IntegrityError(f"the portable worker loaded {source} with fingerprint {loaded.info.fingerprint[:16]}, "
                                 f"the engine's model has {fingerprint[:16]}: not the same weights; load from a "
                                 "file nothing rewrites")
        core = ForwardCore(loaded, EngineSettings.from_dict(settings))
        conn.send(("ok", None))
    except BaseException as e:  # noqa: BLE001 - every failure goes back to the engine, typed
        conn.send(("err", _portable(e)))
        return
    while True:
        try:
            name, args = conn.recv()
        except EOFError:
            return
        try:
            conn.send(("ok", prove(core) if name == "portable_proof" else getattr(core, name)(*args)))
        except BaseException as e:  # noqa: BLE001
            conn.send(("err", _portable(e)))


def _portable(e: BaseException) -> BaseException:
    """``e`` if it survives pickling unchanged, else a SteadyClipError carrying its words."""
    import pickle

    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:  # noqa: BLE001
        return SteadyClipError(f"{type(e).__name__}: {e}")


class RemoteCore(ForwardCore):
    """:class:`ForwardCore` whose forwards, self-checks and proof run in a portable worker process."""

    def __init__(self, loaded: LoadedModel, settings: EngineSettings) -> None:
        source = _source(loaded)
        super().__init__(loaded, settings)
        self._call_lock = threading.Lock()
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        overlay = portable_overlay()
        saved = {k: os.environ.get(k) for k in overlay}
        os.environ.update(overlay)  # spawn starts a fresh interpreter with this process's environment
        try:
            self._proc = ctx.Process(target=_serve, args=(child, *source, loaded.info.fingerprint, settings.to_dict()),
                                     name="steadyclip-portable", daemon=True)
            self._proc.start()
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
        child.close()
        self._answer()  # the worker's load and checks
        _logger.info("portable: forwards run in worker process %d (this process loaded torch without %s)",
                     self._proc.pid, ", ".join(PORTABLE_ENV))

    def _require_portable(self) -> None:
        """This process need not be portable: the worker is (it checks itself)."""

    def _answer(self) -> Any:
        try:
            status, value = self._conn.recv()
        except EOFError as e:
            raise PortableSetupError(f"the portable worker process exited (code {self._proc.exitcode})") from e
        if status == "err":
            raise value
        return value

    def _call(self, name: str, *args: Any) -> Any:
        with self._call_lock:
            self._conn.send((name, args))
            return self._answer()

    def flags(self) -> dict[str, Any]:
        if self._flags is None:
            self._flags = dict(self._call("flags"))
        return self._flags

    def numerics_basis(self) -> str:
        return str(self._call("numerics_basis"))

    def batch_path(self, kind: str) -> str:
        return str(self._call("batch_path", kind))

    def _resolve_threads(self) -> tuple[int, ThreadCheck]:
        if self._threads is None:
            self._threads = self._call("_resolve_threads")
        return self._threads

    def check_threads(self, compared: tuple[int, int]) -> ThreadCheck:
        check: ThreadCheck = self._call("check_threads", compared)
        return check

    def forward_local(self, kind: str, x: Any, size: int | None = None) -> Any:
        self.check_state()  # this process's copy, as every forward checks it
        return self._call("forward_local", kind, x, size)

    def portable_proof(self) -> dict[str, Any]:
        proof: dict[str, Any] = self._call("portable_proof")
        return {**proof, "worker": "forwards run in a worker process started with the portable variables"}

    def after_fork(self) -> None:
        raise PortableSetupError("a portable engine whose forwards run in a worker process has no replicas")

    def close(self) -> None:
        if self._proc.is_alive():
            self._conn.close()
            self._proc.join(timeout=5)
            if self._proc.is_alive():
                self._proc.kill()


def make_core(loaded: LoadedModel, settings: EngineSettings) -> ForwardCore:
    """The forward core; for portable in a process whose torch runs other kernels, one in a worker process."""
    if settings.profile == "portable" or getattr(settings.profile, "name", None) == "portable":
        from steadyclip.numerics.portable import is_ready

        if not is_ready():
            return RemoteCore(loaded, settings)
    return ForwardCore(loaded, settings)


def portable_proof(core: ForwardCore) -> dict[str, Any]:
    """The golden proof of a portable core's rows, wherever they are computed."""
    return core.portable_proof() if isinstance(core, RemoteCore) else prove(core)
