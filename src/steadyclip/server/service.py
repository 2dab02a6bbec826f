"""What the routes do, independent of HTTP framing: decode off the loop, embed on the engine thread.

Every engine call goes through the :class:`~steadyclip.server.batcher.Batcher`
(one thread owns the engine); image decoding and preprocessing run in the
thread pool so the event loop only shuffles bytes. The documents returned are
the ones ``steadyclip classify --json`` / ``embed --json`` print, so a client
can compare a server answer with a CLI answer field for field.
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, TypeVar, cast

import numpy as np
import torch
from starlette.concurrency import run_in_threadpool

from steadyclip._util.futures import completed
from steadyclip.engine.outcome import ImageOutcome, decode_input
from steadyclip.engine.prompts import get_template_set
from steadyclip.engine.recipe import recipe
from steadyclip.errors import InferenceStateError, IntegrityError, SteadyClipError
from steadyclip.results import ClassifyReport
from steadyclip.server import golden as golden_mod
from steadyclip.server.batcher import Batcher, Overloaded
from steadyclip.server.http_errors import ApiError, from_library_error
from steadyclip.server.inputs import ClassifyInput, EmbedInput, ImagePayload
from steadyclip.server.settings import ServerSettings

if TYPE_CHECKING:
    from steadyclip.engine import Engine

_logger = logging.getLogger(__name__)

T = TypeVar("T")


class Service:
    """The engine behind the HTTP routes: batching, golden check, request documents."""

    def __init__(self, engine: Engine, settings: ServerSettings) -> None:
        self.engine = engine
        self.settings = settings
        # One micro-batch in flight per replica: while they compute, the next one is gathered.
        # With replicas, uploads are decoded in them too (in parallel, beside the model); with one
        # process (and on CUDA) they are decoded in the thread pool while the model runs.
        replicas = int(getattr(engine, "replicas", 1))
        self.decode_in_replicas = replicas > 1 and hasattr(engine, "submit")
        self.batcher = Batcher(engine, max_rows=int(getattr(engine, "micro_batch", 8)), in_flight=replicas,
                               max_wait_s=settings.batch_wait_ms / 1000.0, max_queue=settings.max_queue,
                               images_fn=lambda datas: engine.embed_uploads(datas, settings.max_pixels),
                               texts_fn=self._texts_fn(engine), timeout_s=settings.request_timeout_s,
                               text_rows=_text_rows(engine))
        self.golden = golden_mod.Golden()
        self.provenance: dict[str, Any] | None = None
        self.started_at: float | None = None
        self._decode_slots: asyncio.Semaphore | None = None  # created on the server's event loop
        self.overloads = 0  # requests refused with 429
        self.integrity_failures = 0  # requests or readiness probes refused because the model changed
        self.ready = False  # the last readiness probe's verdict

    @staticmethod
    def _texts_fn(engine: Engine) -> Callable[[list[str]], Future[np.ndarray]]:
        """Texts to rows: in the replicas (``Engine.submit_texts``), or here for a stand-in engine."""
        submit = getattr(engine, "submit_texts", None)
        if submit is not None:
            return submit  # type: ignore[no-any-return]
        return lambda texts: completed(engine.embed_texts, texts)

    # ---- lifecycle ----------------------------------------------------------------------
    async def startup(self) -> None:
        """Start the engine thread, run the engine's self-checks, record the golden reference."""
        self._decode_slots = asyncio.Semaphore(self.settings.decode_concurrency)
        start_replicas = getattr(self.engine, "start_replicas", None)
        if start_replicas is not None:
            start_replicas()  # fork them now, before the engine thread exists
        self.batcher.start()
        try:
            prov = await self._engine(lambda: self.engine.provenance.to_dict())
            self.provenance = prov
            self.golden.reference = await self._probe_embedding()
            _logger.info("golden reference recorded (sha256 %s)", (self.golden.digest or "")[:16])
        except Exception as e:  # noqa: BLE001 - the server stays up but reports unready, with the reason
            self.golden.error = f"{type(e).__name__}: {e}"
            _logger.error("start-up self-check failed; /readyz will answer 503: %s", self.golden.error)
        self.started_at = time.time()

    async def shutdown(self) -> None:
        await asyncio.to_thread(self.batcher.stop)

    # ---- engine access ------------------------------------------------------------------
    async def _await(self, fut: Future[T]) -> T:
        return await asyncio.wrap_future(fut)

    async def _engine(self, fn: Callable[[], T]) -> T:
        return await self._await(self._submit(lambda: self.batcher.submit_call(fn)))

    def _submit(self, submit: Callable[[], Future[T]]) -> Future[T]:
        try:
            return submit()
        except Overloaded as e:
            self.overloads += 1
            raise ApiError(429, "Overloaded", f"the server is busy ({e}); retry after the Retry-After seconds",
                           headers={"retry-after": str(max(1, round(e.retry_after_s)))}) from e
        except RuntimeError as e:
            raise ApiError(503, "NotReady", f"{e}; retry shortly") from e

    async def _embed_pixels(self, pixels: torch.Tensor) -> np.ndarray:
        return await self._await(self._submit(lambda: self.batcher.submit_pixels(pixels)))

    async def _probe_embedding(self) -> np.ndarray:
        pixels = await run_in_threadpool(lambda: self.engine.preprocess(golden_mod.probe_image()).unsqueeze(0))
        emb = await self._embed_pixels(pixels)  # (1, D)
        row: np.ndarray = emb[0]
        return row

    async def _embed_images(self, images: list[ImagePayload]) -> tuple[np.ndarray, list[dict[str, Any]]]:
        """Embeddings (n, D) of uploaded images and the decoders' warnings; the first bad image fails the
        request (with the same error wherever it was decoded)."""
        if not self.decode_in_replicas:
            pixels, notes = await self._preprocess(images)
            return await self._embed_pixels(pixels), notes
        rows = await self._await(self._submit(lambda: self.batcher.submit_images([img.data for img in images])))
        for i, (img, row) in enumerate(zip(images, rows)):
            err = row.exception()
            if err is not None:
                raise _image_error(i, img, err)
        return np.stack([row.embedding for row in rows]), _warnings(images, rows)

    async def _preprocess(self, images: list[ImagePayload]) -> tuple[torch.Tensor, list[dict[str, Any]]]:
        """Decode + preprocess in the thread pool, a bounded number of requests at a time.

        Returns the (n, 3, H, W) pixels and the decoders' warnings, one entry per message.
        """
        if self._decode_slots is None:
            raise ApiError(503, "NotReady", "the server is still starting; retry shortly")
        async with self._decode_slots:
            return await run_in_threadpool(self._preprocess_all, images)

    def _preprocess_all(self, images: list[ImagePayload]) -> tuple[torch.Tensor, list[dict[str, Any]]]:
        """Decode and preprocess every image (thread pool); the first bad one fails the request."""
        tensors = []
        outcomes: list[ImageOutcome] = []
        for i, img in enumerate(images):
            try:
                outcome, pixels = decode_input(i, img.data, self.engine.loaded.preprocess,
                                               max_pixels=self.settings.max_pixels)
            except SteadyClipError as e:  # not the image's fault (a setting): still named by its image
                raise _image_error(i, img, e) from e
            err = outcome.exception()
            if err is not None:
                raise _image_error(i, img, err)
            tensors.append(cast(torch.Tensor, pixels))  # an outcome without error has its pixels
            outcomes.append(outcome)
        return torch.stack(tensors), _warnings(images, outcomes)  # (n, 3, H, W)

    @property
    def created(self) -> int:
        """Unix time the server started (OpenAI's model ``created``)."""
        return int(self.started_at or time.time())

    async def count_tokens(self, texts: list[str]) -> int:
        """Tokens the model's tokenizer makes of ``texts``, start/end markers included (OpenAI's usage)."""
        def count() -> int:
            return int((self.engine.loaded.tokenizer(texts) != 0).sum())

        return await self._engine(count)

    # ---- requests -----------------------------------------------------------------------
    async def with_timeout(self, work: Awaitable[T]) -> T:
        """Run a request's work under the server's timeout; 504 when it runs out."""
        try:
            return await asyncio.wait_for(work, timeout=self.settings.request_timeout_s)
        except TimeoutError:
            raise ApiError(
                504, "Timeout",
                f"the request took longer than the server's {self.settings.request_timeout_s:g}s timeout; "
                "send fewer images/labels per request or retry when the server is less busy",
            ) from None

    async def classify(self, inp: ClassifyInput) -> dict[str, Any]:
        """The ``classify --json`` document for one request."""
        labels = inp.labels
        tset = inp.templates or get_template_set(self.engine.loaded.default_templates)
        classes_fut = self._submit(lambda: self.batcher.submit_call(lambda: self.engine.class_embeddings(labels, tset)))
        try:
            image_emb, notes = await self._embed_images(inp.images)
        except BaseException:
            classes_fut.cancel()
            raise
        classes = await self._await(classes_fut)
        names = [img.name for img in inp.images]
        results = await self._engine(
            lambda: self.engine.classify_embeddings(image_emb, classes, labels, tset, top_k=inp.top_k, sources=names))
        # The document `steadyclip classify --json` prints (a bad upload failed the request before this),
        # with what `steadyclip verify` needs to recompute it: the recipe and each upload's SHA-256.
        doc = ClassifyReport(tuple(results), results[0].provenance).to_dict() | {"warnings": notes, "recipe": recipe(
            self.engine, labels=labels, templates=tset.name, top_k=inp.top_k)}
        for row, img in zip(doc["results"], inp.images):
            row["sha256"] = hashlib.sha256(img.data).hexdigest()
        return doc

    async def embed(self, inp: EmbedInput) -> dict[str, Any]:
        """The ``embed --json`` document for one request."""
        texts_fut = self._submit(lambda: self.batcher.submit_texts(inp.texts)) if inp.texts else None
        doc: dict[str, Any] = {"images": [], "texts": [], "warnings": []}
        if inp.images:
            try:
                emb, doc["warnings"] = await self._embed_images(inp.images)
            except BaseException:
                if texts_fut is not None:
                    texts_fut.cancel()
                raise
            doc["images"] = [{"source": img.name, "sha256": hashlib.sha256(img.data).hexdigest(),
                              "embedding": _encode(e, inp.encoding)} for img, e in zip(inp.images, emb)]
        if texts_fut is not None:
            temb = await self._await(texts_fut)
            doc["texts"] = [{"text": t, "embedding": _encode(e, inp.encoding)} for t, e in zip(inp.texts, temb)]
        doc["provenance"] = self.provenance if self.provenance is not None else await self._engine(
            lambda: self.engine.provenance.to_dict())
        if inp.encoding == "base64":
            doc["encoding"] = "base64 of little-endian float32"
        doc["recipe"] = recipe(self.engine)  # settings and model source: what `steadyclip verify` recomputes with
        return doc

    async def self_check(self) -> tuple[bool, dict[str, Any]]:
        """Check this process's model (text tower and head serve from it), then recompute the probe
        embedding through the serving path (the replicas, if any) and compare it bitwise with the
        start-up reference."""
        t0 = time.perf_counter()
        detail: dict[str, Any] = {"golden_sha256": self.golden.digest, "probe": golden_mod.PROBE_DESCRIPTION}
        try:
            check_state = getattr(self.engine, "check_state", None)
            if check_state is not None:
                await self._engine(check_state)
            fresh = await asyncio.wait_for(self._probe_embedding(), timeout=self.settings.request_timeout_s)
            problem = self.golden.compare(fresh)
        except ApiError as e:
            problem = e.message
        except TimeoutError:
            problem = f"the self-check did not finish within {self.settings.request_timeout_s:g}s (engine stuck?)"
        except (IntegrityError, InferenceStateError) as e:
            self.integrity_failures += 1
            problem = f"{type(e).__name__}: {e}"
        except Exception as e:  # noqa: BLE001 - NaNs, a dead worker...: unready, with the reason
            problem = f"{type(e).__name__}: {e}"
        detail["check_ms"] = round((time.perf_counter() - t0) * 1000, 3)
        if problem is not None:
            detail["problem"] = problem
        self.ready = problem is None
        return problem is None, detail

    def model_document(self) -> dict[str, Any]:
        """What ``GET /v1/model`` returns."""
        info = self.engine.loaded.info
        doc: dict[str, Any] = {
            "model": info.to_dict(),
            "provenance": self.provenance,
            "golden": {"sha256": self.golden.digest, "probe": golden_mod.PROBE_DESCRIPTION, "error": self.golden.error},
            "limits": self.settings.public_dict(),
            "batching": {"max_rows": self.batcher.max_rows, "in_flight": self.batcher.in_flight,
                         "wait_ms": self.settings.batch_wait_ms,
                         **self.batcher.stats.to_dict()},
            "suggested_labels": _suggested_labels(info.arch),
        }
        execution = getattr(self.engine, "execution", None)
        if execution is not None:  # replicas, threads, CPUs: how the answers are computed here
            doc["execution"] = execution.to_dict()
        return doc


def _image_error(i: int, img: ImagePayload, e: SteadyClipError | BaseException) -> ApiError:
    """A bad upload's error, naming which image of the request it was."""
    api = from_library_error(e) if isinstance(e, SteadyClipError) else ApiError(422, type(e).__name__, str(e))
    name = f" ({img.name})" if img.name else ""
    return ApiError(api.status, api.type, f"image #{i}{name}: {api.message}")


def _warnings(images: list[ImagePayload], outcomes: list[ImageOutcome]) -> list[dict[str, Any]]:
    """The decoders' warnings of a request's images, one entry per message (the documents' ``warnings``)."""
    return [{"index": i, "source": img.name, "message": m}
            for i, (img, o) in enumerate(zip(images, outcomes)) for m in o.warnings]


TEXT_GATHER = 4  # a text micro-batch (one replica's forward) gathers up to this many times the base rows


def _text_rows(engine: Engine) -> int:
    """Texts per micro-batch: under load a forward of 4x the base rows where proven to give the same
    bits (ViT-B-32, 8 tokens, 1 thread: 32 rows 97 texts/s, 8 rows 73-81); a lone request is not held
    back for more (the batcher waits for companions only while replicas are busy)."""
    shapes = getattr(engine, "text_shapes", None)
    base = int(shapes.rows[0]) if shapes is not None else int(getattr(engine, "text_micro_batch", 8))
    return TEXT_GATHER * base


def _encode(vec: np.ndarray, encoding: str) -> Any:
    if encoding == "base64":
        return base64.b64encode(np.ascontiguousarray(vec, dtype="<f4").tobytes()).decode("ascii")
    return vec.tolist()


def _suggested_labels(arch: str) -> list[str]:
    """Labels for the web page to offer: the demo architecture's training classes, else none."""
    from steadyclip.model import registry

    return registry.demo_labels() if arch == registry.DEMO_ARCH else []
