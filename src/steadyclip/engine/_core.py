"""The forward core: a verified model run at fixed shapes under one profile. Internal.

The bottom of the engine. Everything that computes rows goes through :meth:`ForwardCore.forward_local`:
the facade (:class:`steadyclip.Engine`) in this process, and every replica process, which holds
a forked copy of the core (never of the facade). The helpers above it (replicas, rows, the fast
profile's record) take a core, so nothing below the facade imports it.

Why fixed shapes: on CPU a row's bits are the same whatever its neighbours *at the same batch
shape* (measured, DESIGN.md), not across shapes. So every forward runs at exactly the
micro-batch, the tail padded - unless a self-check proves single rows equal to full-batch rows,
then tails run row by row.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from steadyclip.engine import precision
from steadyclip.engine.images import ImageInput, load_image
from steadyclip.engine.settings import EngineSettings
from steadyclip.engine.text_shapes import TextShapes, bucket_encoder, text_shapes
from steadyclip.model.loading import LoadedModel
from steadyclip.numerics import determinism, identity, selfcheck
from steadyclip.numerics.head import normalise
from steadyclip.numerics.selfcheck import ThreadCheck

_logger = logging.getLogger(__name__)

__all__ = ["ForwardCore"]

Forward = Callable[[torch.Tensor], torch.Tensor]
PROBE_SEED = 1234


class ForwardCore:
    """One model, one profile, fixed shapes: the rows every entry point computes.

    Args:
        loaded: a model from :func:`steadyclip.load`.
        settings: the engine's settings (profile, shapes, requested threads).
    """

    def __init__(self, loaded: LoadedModel, settings: EngineSettings) -> None:
        self.loaded = loaded
        self.settings = settings
        self.device = next(loaded.model.parameters()).device
        self.profile = determinism.resolve_profile(settings.profile, self.device.type, settings.onednn)
        if self.profile.name == "portable":
            self._require_portable()  # refuse now, not at the first forward
        # fast: a reduced-precision copy cast once (steadyclip.engine.precision); None = run loaded.model (fp32)
        self.cast = precision.prepare(loaded, self.profile, self.device.type,
                                      allow_emulated_bf16=settings.allow_emulated_bf16)
        self.text_shapes: TextShapes = text_shapes(self._model(), loaded.info.context_length, settings.text_buckets,
                                                   settings.text_micro_batch)
        self._bucket_fn = bucket_encoder(self._model(), self.text_shapes)
        self.lock = threading.RLock()
        self._paths: dict[str, str] = {}
        self._flags: dict[str, Any] | None = None
        self._numerics: str | None = None
        self._threads: tuple[int, ThreadCheck] | None = None
        self._text_sizes: dict[int | None, tuple[int, ...]] = {}
        self._long_tokens: torch.Tensor | None = None
        self.checks_running = False  # self-checks forward here, never in replicas

    def _require_portable(self) -> None:
        from steadyclip.numerics.portable import check_ready

        check_ready()

    def close(self) -> None:
        """Release what the core holds outside this process (nothing, here)."""

    # ---- shapes and towers ------------------------------------------------------------------
    def size(self, kind: str, length: int | None = None) -> int:
        """Rows per forward of the ``"image"`` tower, or of the ``"text"`` tower at a bucket ``length``
        (``None``: the context length)."""
        return self.settings.micro_batch if kind == "image" else self.text_shapes.rows_for(length)

    def _model(self) -> Any:
        return self.loaded.model if self.cast is None else self.cast.model

    def tower(self, kind: str, length: int | None = None) -> Forward:
        """The encode function of the ``"image"`` or ``"text"`` tower (fast: inputs cast to the weights' dtype);
        for text, at sequence ``length`` (a bucket shorter than the context length) when given."""
        model: Any = self._model()
        fn: Forward = model.encode_image if kind == "image" else model.encode_text
        if kind == "text" and length is not None and length < self.text_shapes.buckets[-1]:
            assert self._bucket_fn is not None, "a shorter text length needs text buckets"
            fn = self._bucket_fn
        if self.cast is not None:
            cast = self.cast.cast_input
            return lambda x: fn(cast(x))  # outputs go back to float32 in forward_local
        return fn

    def probe_inputs(self, kind: str) -> torch.Tensor:
        """Fixed pseudo-random inputs of one micro-batch of a tower, for the self-checks."""
        size = self.size(kind)
        if kind == "image":
            h, w = self.loaded.info.preprocess.size
            if self.profile.name == "portable":  # integer draws: the same pixels on every CPU (randn uses libm)
                levels = np.random.default_rng(PROBE_SEED).integers(0, 256, size=(size, 3, h, w))
                return torch.from_numpy(levels.astype(np.float32) / 64.0 - 2.0).to(self.device)
            gen = torch.Generator().manual_seed(PROBE_SEED)
            return torch.randn((size, 3, h, w), generator=gen).to(self.device)
        tokens: torch.Tensor = self.loaded.tokenizer([f"a photo of probe number {i}." for i in range(size)])
        return tokens.to(self.device)

    def preprocess(self, image: ImageInput) -> torch.Tensor:
        """Decode and validate one image, then apply the model's own eval transform: (3, H, W)."""
        tensor: torch.Tensor = self.loaded.preprocess(load_image(image))
        return tensor

    # ---- identity ---------------------------------------------------------------------------
    def flags(self) -> dict[str, Any]:
        """The numerics flags forwards run under (read once)."""
        if self._flags is None:
            with determinism.applied(self.profile, self.device.type) as flags:
                self._flags = dict(flags)
        return self._flags

    def numerics_basis(self) -> str:
        """Weights, code versions and every numerics flag a forward's bits depend on (one key)."""
        if self._numerics is None:
            info = self.loaded.info
            self._numerics = identity.numerics_key(
                fingerprint=info.fingerprint, config_hash=info.config_hash, profile=self.profile.to_dict(),
                device=str(self.device), flags=self.flags())
        return self._numerics

    def batch_path(self, kind: str) -> str:
        """Which batching path a tower uses (self-checked once per model and stack, remembered).

        Bucketed texts always run at the fixed shape (``"fixed-shape"``): nothing to check."""
        if kind == "text" and self.text_shapes.pool != "full":
            return "fixed-shape"
        if kind not in self._paths:
            with self._checking():
                self._paths[kind] = selfcheck.batch_path(
                    self.tower(kind), self.probe_inputs(kind), self.profile, self.device.type,
                    self.numerics_basis(), kind=kind, fixed=self.settings.batch_invariance == "fixed")
        return self._paths[kind]

    # ---- threads: the one thread self-check -------------------------------------------------
    @property
    def threads(self) -> int:
        """Intra-op threads each forward runs at: the requested count where proven not to change a bit, else 1."""
        return self._resolve_threads()[0]

    @property
    def thread_verdict(self) -> ThreadCheck:
        """The thread self-check behind :attr:`threads` (``"not-checked"`` when 1 thread was asked for)."""
        return self._resolve_threads()[1]

    def _resolve_threads(self) -> tuple[int, ThreadCheck]:
        if self._threads is None:
            wanted = self.settings.requested_threads
            if wanted == 1:
                self._threads = (1, ThreadCheck("not-checked", (1,)))
            else:
                check = self.check_threads((1, wanted))
                if not check.invariant and check.verdict != "not-applicable":
                    _logger.warning("threads=%d refused: this model's rows at %d threads differ from its rows at 1 "
                                    "thread on this machine; running 1 thread per replica (more replicas instead)",
                                    wanted, wanted)
                self._threads = (wanted if check.invariant or check.verdict == "not-applicable" else 1, check)
        return self._threads

    def check_threads(self, compared: tuple[int, int]) -> ThreadCheck:
        """Are rows of both towers at the two thread counts bitwise equal? (:func:`selfcheck.thread_check`)

        Measured even on one CPU: threads are software threads, and their count can change the
        kernels' reduction order whatever the cores (``not-applicable`` only off the CPU)."""
        with self._checking():
            towers = {kind: (self.tower(kind), self.probe_inputs(kind)) for kind in ("image", "text")}
            return selfcheck.thread_check(towers, self.profile, self.device.type, self.numerics_basis(), compared)

    # ---- forwards ---------------------------------------------------------------------------
    def check_state(self) -> None:
        """Refuse (or repair, per the guard) a model not in inference state or changed in memory."""
        self.loaded.ensure_inference_state()
        self.loaded.check_buffers()
        if self.cast is not None:
            self.cast.check()

    def forward_local(self, kind: str, x: torch.Tensor, size: int | None = None) -> np.ndarray:
        """Encode rows of ``x`` in this process at the fixed shapes; raw float32 (N, D).

        Texts (token rows at the context length) run grouped by their sequence-length bucket,
        each group in forwards of proven row counts (:meth:`chunks`), and come back in input order.
        ``size``: run all of ``x`` (one shape group) as one forward of that many rows, as planned by
        the process that split the work (:meth:`shape_tasks`).
        """
        with self.lock:
            self.check_state()
            groups = self._groups(kind, x)
            threads = self.threads
            out: np.ndarray | None = None
            with determinism.applied(self.profile, self.device.type, threads=threads), torch.inference_mode(), \
                    determinism.autocast(self.profile, self.device.type):
                for rows, length, path in groups:
                    fn, part = self.tower(kind, length), x[rows]
                    if length is not None:
                        part = part[:, :length]  # (n, L): the tokens after each row's end-of-text token
                    sizes = [size] if size is not None else self.chunks(kind, length, part.shape[0])
                    starts = np.cumsum([0, *sizes[:-1]])
                    done = [selfcheck.run_chunk(fn, part[s : s + z].to(self.device), z, path)
                            for s, z in zip(starts, sizes)]
                    block = np.concatenate(done, axis=0)  # (n, D)
                    if out is None:
                        out = np.empty((x.shape[0], block.shape[1]), dtype=np.float32)
                    out[rows] = block
        return out if out is not None else np.zeros((0, 0), dtype=np.float32)

    def shape_tasks(self, kind: str, x: torch.Tensor, spread: int = 1) -> list[tuple[np.ndarray, int]]:
        """``x`` split into forwards: (row indices, rows of the forward) each, one shape per forward;
        each shape group in at least ``spread`` forwards where it has the rows (one per replica)."""
        tasks = []
        for rows, length, _ in self._groups(kind, x):
            start = 0
            for z in self.chunks(kind, length, len(rows), spread):
                tasks.append((rows[start : start + z], z))
                start += z
        return tasks

    def chunks(self, kind: str, length: int | None, n: int, spread: int = 1) -> list[int]:
        """Rows of each forward for ``n`` rows of one shape group (the last one may be padded).

        Images: the micro-batch. Texts: the largest proven row count that ``n`` still fills (at most
        ``n / spread`` rows where that is more than the base, so every replica gets a share), and for
        the rest the smallest that holds it when that pads fewer than the base rows.
        """
        base = self.size(kind, length)
        if n <= base:
            return [base]  # one forward of the base rows: no larger count needed (nor checked)
        options = self.text_sizes(length) if kind == "text" else (base,)
        if spread > 1:  # each share of the rows fills its own forwards
            share = max(base, -(-n // spread))
            options = tuple(z for z in options if z <= share) or options[:1]
        sizes, left = [], n
        while left > 0:
            fits = [z for z in options if z <= left]
            holds = [z for z in options if z >= left]
            z = holds[0] if holds and (not fits or holds[0] - left < options[0]) else (fits[-1] if fits else options[0])
            sizes.append(z)
            left -= z
        return sizes

    def text_sizes(self, length: int | None) -> tuple[int, ...]:
        """Rows a text forward at bucket ``length`` may run: the base rows, and the larger counts the
        self-check proved to give the same bits (:func:`selfcheck.text_rows`; once per machine)."""
        if length not in self._text_sizes:
            options = self.text_shapes.row_options(length)
            with self.lock, self._checking():
                probe = self._text_probe(length, options[-1]) if len(options) > 1 else None
                self._text_sizes[length] = options[:1] if probe is None else selfcheck.text_rows(
                    self.tower("text", length), probe, options, self.profile, self.device.type,
                    self.numerics_basis(), self.threads)
        return self._text_sizes[length]

    def _groups(self, kind: str, x: torch.Tensor) -> list[tuple[np.ndarray, int | None, str]]:
        """(row indices, sequence length or None, batch path) per shape a forward of ``x`` runs at."""
        everything = np.arange(x.shape[0])
        if kind == "image" or self.text_shapes.pool == "full":
            return [(everything, None, self.batch_path(kind))]
        buckets = self.text_shapes.bucket_of(x)
        # bucketed texts always run at fixed shapes of proven row counts: a padded tail costs little
        return [(everything[buckets == b], int(b), "fixed-shape") for b in self.text_shapes.buckets
                if (buckets == b).any()]

    def _text_probe(self, length: int | None, rows: int) -> torch.Tensor:
        """``rows`` real token rows cut to ``length`` tokens, each ending at its end-of-text token."""
        if self._long_tokens is None or self._long_tokens.shape[0] < rows:
            words = " ".join(f"probe word {j}" for j in range(40))
            self._long_tokens = self.loaded.tokenizer([f"{i} {words}" for i in range(max(rows, 128))])
        tokens = self._long_tokens[:rows]
        ends = torch.from_numpy(self.text_shapes.lengths(tokens) - 1)
        n = length or tokens.shape[1]
        out = tokens[:, :n].clone()
        out[:, n - 1] = tokens[torch.arange(rows), ends]  # each row's own end-of-text token
        return out.to(self.device)

    def embed_local(self, kind: str, x: torch.Tensor) -> np.ndarray:
        """:meth:`forward_local`, L2-normalised: what every entry point returns for ``x``."""
        return normalise(self.forward_local(kind, x), kind)

    def after_fork(self) -> None:
        """In a new replica process: a fresh lock (a parent thread may have held it at fork), pinned threads."""
        self.lock = threading.RLock()
        torch.set_num_threads(self.threads)

    def _checking(self) -> _Checking:
        return _Checking(self)


class _Checking:
    """Marks the core as running self-checks (their forwards stay in this process)."""

    def __init__(self, core: ForwardCore) -> None:
        self.core, self.outer = core, False

    def __enter__(self) -> None:
        self.outer, self.core.checks_running = self.core.checks_running, True

    def __exit__(self, *exc: object) -> None:
        self.core.checks_running = self.outer
