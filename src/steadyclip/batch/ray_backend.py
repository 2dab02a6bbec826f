"""Run a batch job's model stage on Ray Data: same rows, same bits, more machines.

``run_batch(..., backend="ray")`` (CLI: ``steadyclip batch --engine ray``) sends
the job's pending inputs through ``ray.data.from_items(...).map_batches(...)``
with a pool of actors, each holding its own :class:`~steadyclip.engine.Engine`
rebuilt from the driver's model source and settings. An actor refuses to start
unless its weights hash, state fingerprint, profile, threads, micro-batch,
batch path and numerics key (software versions, numerics flags, CPU) equal the
driver's (``identity.result_identity``), so every row is computed exactly as the local
backend would compute it. Results come back in input order (``preserve_order``)
and go through the same part files, journal and assembly as a local job.

Ray is optional: ``pip install 'steadyclip[ray]'``. Without ``address`` a local
Ray instance is started (and shut down afterwards); with one, the model source
(bundled model, checkpoint path, hub cache) must be readable on every node.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from steadyclip.batch import _prep
from steadyclip.batch.inputs import InputItem
from steadyclip.engine import errmap
from steadyclip.engine.layout import usable_cpus
from steadyclip.engine.outcome import ImageOutcome
from steadyclip.errors import BatchJobError, InputError, IntegrityError, SteadyClipError
from steadyclip.numerics import identity

if TYPE_CHECKING:
    from steadyclip.engine import Engine

_logger = logging.getLogger(__name__)

__all__ = ["RayPipeline", "engine_spec", "require_ray", "verified_engine"]

def require_ray() -> Any:
    """Import ray, or say how to install it."""
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")  # never let Ray re-run us under `uv run`
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        import ray
        import ray.data
    except ImportError as e:
        raise BatchJobError(
            "the Ray backend needs Ray Data: pip install 'steadyclip[ray]' (or use --engine local)"
        ) from e
    return ray


def engine_spec(engine: Engine) -> dict[str, Any]:
    """How to rebuild ``engine`` in another process: model source and engine settings."""
    info = engine.loaded.info
    source = info.model_id
    if info.revision and source.startswith("hf-hub:") and "@" not in source:
        source = f"{source}@{info.revision}"  # pin the exact hub commit the driver loaded
    # One process per actor: the actor is the replica (Ray spreads actors over CPUs and nodes).
    return {"source": source, "pretrained": info.pretrained, "guard": engine.loaded.guard,
            "settings": engine.settings.replace(replicas=1).to_dict()}


ACTOR_START_TIMEOUT_S = 600  # every model actor must be up before work starts; then a clear error

def verified_engine(spec: dict[str, Any], expected: dict[str, Any]) -> tuple[Engine, str]:
    """In an actor: rebuild the driver's engine from ``spec``; refuse unless its result identity is ``expected``.

    Returns the engine and this actor's Ray node id."""
    import ray

    from steadyclip.engine import Engine
    from steadyclip.engine.settings import EngineSettings
    from steadyclip.model.loading import load

    loaded = load(spec["source"], pretrained=spec["pretrained"], guard=spec["guard"])
    engine = Engine(loaded, EngineSettings.from_dict(spec["settings"]), text_cache=None)
    actual = identity.result_identity(engine.provenance.to_dict(), engine.numerics_basis())
    diffs = [f"{k}: driver {v!r}, actor {actual.get(k)!r}" for k, v in expected.items() if actual.get(k) != v]
    if diffs:
        raise IntegrityError(
            "a Ray actor's model or settings differ from the driver's, its results would not be the same: "
            + "; ".join(diffs) + " (numerics covers the software versions, numerics flags and CPU). Make the "
            "same weights and steadyclip/torch/open_clip versions available on every node."
        )
    return engine, str(ray.get_runtime_context().get_node_id())


class _EmbedActor:
    """A Ray actor: its own verified engine; decodes and embeds batches of inputs."""

    def __init__(self, spec: dict[str, Any], expected: dict[str, Any], dim: int, max_file_bytes: int) -> None:
        self.engine, self.node = verified_engine(spec, expected)
        self.dim = dim
        self.max_file_bytes = max_file_bytes

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        items = [InputItem(int(i), str(p), str(loc))
                 for i, p, loc in zip(batch["index"], batch["path"], batch["location"])]
        transform = self.engine.loaded.preprocess
        prepared = [_prep.prepare(it, transform, self.max_file_bytes) for it in items]
        outcomes = [o for o, _ in prepared]
        emb = np.zeros((len(items), self.dim), dtype=np.float32)  # (N, D); error rows stay zero, flagged below
        good = [(i, pixels) for i, (_, pixels) in enumerate(prepared) if pixels is not None]
        if good:
            emb[[i for i, _ in good]] = self.engine.embed_pixels(_prep.pixel_batch([p for _, p in good]))  # (K, D)
        # Strings travel as "" rather than None: an all-None column would lose its type on the way.
        return {
            "index": np.array([o.index for o in outcomes], dtype=np.int64),
            "path": np.array([o.source for o in outcomes], dtype=object),
            "sha256": np.array([o.sha256 or "" for o in outcomes], dtype=object),
            "error_type": np.array([o.error_type or "" for o in outcomes], dtype=object),
            "error_message": np.array([o.error_message or "" for o in outcomes], dtype=object),
            "ok": np.array([o.ok for o in outcomes], dtype=bool),
            "embedding": emb,
            "node": np.array([self.node] * len(outcomes), dtype=object),
        }


class RayPipeline:
    """The model stage of a batch job on Ray Data (drop-in for ``LocalPipeline``)."""

    def __init__(self, engine: Engine, *, dim: int, address: str | None = None, actors: int | None = None,
                 max_file_bytes: int = _prep.DEFAULT_MAX_FILE_BYTES, batch_size: int | None = None,
                 verbose: bool = False) -> None:
        if actors is not None and (isinstance(actors, bool) or not isinstance(actors, int) or actors < 1):
            raise InputError(f"actors must be an int >= 1 (or None: one per {engine.threads} CPU(s) of the "
                             f"cluster), got {actors!r}")
        self.engine = engine
        self.dim = dim
        self.address = address
        self.actors = actors
        self.max_file_bytes = max_file_bytes
        self.batch_size = batch_size or 4 * engine.micro_batch
        self.verbose = verbose
        self.nodes: set[str] = set()  # Ray nodes whose actors computed rows
        self.workers = actors or 0  # model actors (the pool's size once a run has started them)
        self.spec = engine_spec(engine)  # what actors rebuild; they verify it against the driver's provenance
        self.model_s = 0.0  # not measured: the model runs in the actors
        self.wait_s = 0.0

    def _init(self, ray: Any) -> bool:
        """Connect to ``address`` or start a small local Ray; True if we started it (and must stop it)."""
        if ray.is_initialized():
            return False
        quiet = {} if self.verbose else {"logging_level": logging.WARNING, "configure_logging": True}
        if self.address:
            ray.init(address=self.address, include_dashboard=False, log_to_driver=self.verbose, **quiet)
        else:
            want = (self.actors or usable_cpus() // self.engine.threads) * self.engine.threads
            # address="local": a new instance, never one found on this machine (another job's, a `ray start`).
            ray.init(address="local", num_cpus=max(2, want), include_dashboard=False, log_to_driver=self.verbose,
                     object_store_memory=256 * 1024 * 1024, **quiet)
        return True

    def _actor_env(self) -> dict[str, Any]:
        """portable: actors' processes start with the variables its numerics need (before torch loads)."""
        if self.engine.profile.name != "portable":
            return {}
        from steadyclip.numerics.early import PORTABLE_ENV, PORTABLE_SPEED_ENV

        return {"runtime_env": {"env_vars": {**PORTABLE_SPEED_ENV, **PORTABLE_ENV}}}

    def _actor_count(self, ray: Any) -> int:
        """The given count, or one actor per ``threads`` CPUs the cluster has (all nodes)."""
        if self.actors is not None:
            return self.actors
        cpus = int(ray.cluster_resources().get("CPU", 1))
        return max(1, cpus // int(self.engine.threads))

    def run(self, items: Iterator[InputItem], part_size: int) -> Iterator[list[ImageOutcome]]:
        """Ordered results for ``items``, one Ray batch at a time."""
        rows = [{"index": it.index, "path": it.path, "location": it.location} for it in items]
        kwargs = {"dim": self.dim, "max_file_bytes": self.max_file_bytes}
        for batch in self.stream(rows, _EmbedActor, kwargs):
            yield _results(batch)

    def stream(self, rows: list[dict[str, Any]], actor: type, kwargs: dict[str, Any]) -> Iterator[dict[str, np.ndarray]]:
        """``rows`` through a pool of ``actor(spec=, expected=, **kwargs)``: their output batches, in input order.

        Starts (and stops) a local Ray, or joins ``address``; maps Ray's failures to steadyclip errors.
        Every output batch must carry a ``node`` column (the actor's Ray node id)."""
        if not rows:
            return
        ray = require_ray()
        started = self._init(ray)
        ctx = ray.data.DataContext.get_current()
        saved = (ctx.execution_options.preserve_order, ctx.enable_progress_bars, ctx.wait_for_min_actors_s)
        ctx.execution_options.preserve_order = True  # rows must come back in input order for the parts
        ctx.enable_progress_bars = False
        # Every actor loaded before the first batch: else the first to start takes all the work and
        # the other nodes idle (the model takes seconds to load, a batch a fraction of that).
        ctx.wait_for_min_actors_s = ACTOR_START_TIMEOUT_S
        try:
            expected = identity.result_identity(self.engine.provenance.to_dict(), self.engine.numerics_basis())
            self.workers = self._actor_count(ray)
            ds = ray.data.from_items(rows).map_batches(
                actor, fn_constructor_kwargs={"spec": self.spec, "expected": expected, **kwargs},
                batch_size=self.batch_size, batch_format="numpy",
                # One batch in flight per actor: the next goes to an idle actor (on any node), not a queue.
                compute=ray.data.ActorPoolStrategy(size=self.workers, max_tasks_in_flight_per_actor=1),
                num_cpus=self.engine.threads, **self._actor_env(),
            )
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                self.nodes.update(str(n) for n in batch["node"])
                yield batch
        except SteadyClipError:
            raise
        except ray.exceptions.GetTimeoutError as e:
            raise BatchJobError(
                f"{self._actor_count(ray)} model actors did not all start within {ACTOR_START_TIMEOUT_S}s: the "
                "cluster lacks the CPUs or memory for them; pass fewer actors (workers= / --workers)") from e
        except Exception as e:
            raise errmap.from_ray(e) or BatchJobError(f"the Ray job failed: {type(e).__name__}: {e}") from e
        finally:
            ctx.execution_options.preserve_order, ctx.enable_progress_bars, ctx.wait_for_min_actors_s = saved
            if started:
                ray.shutdown()


def _results(batch: dict[str, np.ndarray]) -> list[ImageOutcome]:
    out = []
    for i in range(len(batch["index"])):
        index, path, sha = int(batch["index"][i]), str(batch["path"][i]), str(batch["sha256"][i]) or None
        if bool(batch["ok"][i]):
            out.append(ImageOutcome(index, path, sha, np.array(batch["embedding"][i], dtype=np.float32)))
        else:
            error = (str(batch["error_type"][i]), str(batch["error_message"][i]))
            out.append(ImageOutcome.failed(index, path, error, sha256=sha))
    return out
