"""The FastAPI app factory: routes, error handlers, the gate middleware and the web page.

Routes:
    POST /v1/classify   zero-shot classification (multipart upload or JSON with base64 images)
    POST /v1/embed      image and/or text embeddings
    GET  /v1/model      model identity, provenance, golden digest, limits
    POST /v1/embeddings OpenAI-compatible embeddings (texts; images with "modality": "image")
    GET  /v1/models     OpenAI-compatible model list
    GET  /metrics       Prometheus text (requests, latency, micro-batch rows, queue, readiness, integrity)
    GET  /healthz       the process is alive
    GET  /readyz        model loaded *and* the golden probe recomputes bitwise (else 503)
    GET  /              the web page;  GET /docs  the API reference (rendered locally from /openapi.json)
"""
from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles

from steadyclip import __version__
from steadyclip.server import inputs, openai_api, schemas
from steadyclip.server import openapi_constraints as oc
from steadyclip.server.gate import GateMiddleware
from steadyclip.server.http_errors import error_body, install_handlers
from steadyclip.server.metrics import Metrics, MetricsMiddleware
from steadyclip.server.service import Service
from steadyclip.server.settings import ServerSettings

if TYPE_CHECKING:
    from steadyclip.engine import Engine

_logger = logging.getLogger(__name__)

WEB_DIR = Path(__file__).resolve().parent / "web"

# Everything the page needs is served from here; the policy makes any external load fail loudly.
_PAGE_HEADERS = {
    "content-security-policy": "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; "
                               "script-src 'self'; connect-src 'self'; object-src 'none'; base-uri 'none'; "
                               "frame-ancestors 'none'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-cache",
}

_DESCRIPTION = """Reproducible OpenCLIP inference over HTTP. Every answer is bitwise the one
`steadyclip classify --json` gives for the same input on this machine and software stack, and
carries its provenance (weights SHA-256, state fingerprint, profile, threads, micro-batch shape).
Errors are `{"error": {"type", "message"}}` (OpenAI's error object on `/v1/embeddings` and `/v1/models`).
Busy: 429 with `Retry-After`. With a token, send `Authorization: Bearer <token>` on `/v1/*`."""


def create_app(engine: Engine, *, settings: ServerSettings | None = None) -> FastAPI:
    """Build the HTTP app around a ready :class:`~steadyclip.engine.Engine`.

    The engine is owned by one worker thread from start-up (the app's lifespan)
    to shutdown; nothing else should use it meanwhile.

    Args:
        engine: the engine to serve.
        settings: limits, token, timeouts (default: :class:`ServerSettings` defaults, no token).

    Example:
        >>> from fastapi.testclient import TestClient
        >>> app = create_app(Engine(load()), settings=ServerSettings(token="s3cret"))
        >>> with TestClient(app) as client:
        ...     client.get("/readyz").status_code
        200
    """
    settings = settings or ServerSettings()
    service = Service(engine, settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await service.startup()
        try:
            yield
        finally:
            await service.shutdown()

    app = FastAPI(
        title="steadyclip", version=__version__, description=_DESCRIPTION, lifespan=lifespan,
        # FastAPI's built-in /docs and /redoc pull JavaScript from a CDN; ours render /openapi.json locally.
        docs_url=None, redoc_url=None, openapi_url="/openapi.json",
    )
    app.state.service = service
    app.state.settings = settings
    metrics = Metrics(service)
    service.batcher.on_batch = metrics.batch_rows.observe
    app.state.metrics = metrics
    app.add_middleware(GateMiddleware, token=settings.token, max_body_bytes=settings.max_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=metrics)  # outermost: counts what the gate refuses too
    install_handlers(app)
    _add_api_routes(app, service, settings)
    openai_api.add_routes(app, service, settings, str(engine.loaded.info.model_id), int(engine.embedding_dim))

    @app.get("/metrics", tags=["health"], responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                                                           "description": "Prometheus text exposition"}})
    async def metrics_route() -> Response:
        """Prometheus metrics: requests by route and status, latency, micro-batch rows, queue, readiness."""
        body, media = metrics.render()
        return Response(body, media_type=media)

    _add_web_routes(app)
    return app


def _add_api_routes(app: FastAPI, service: Service, settings: ServerSettings) -> None:
    @app.post("/v1/classify", tags=["inference"], openapi_extra=oc.classify_body(settings),
              responses={200: {"model": schemas.ClassifyResponse}, **schemas.ERRORS})
    async def classify(request: Request) -> JSONResponse:
        """Zero-shot classify image(s) against labels; probabilities + provenance.

        Multipart: file field `image` (repeatable), `labels` (repeatable, or one per line), optional
        `templates`, `top_k`. JSON: `{"image": "<base64>", "labels": [...], "templates": "photo", "top_k": 3}`.
        """
        async def work() -> dict[str, Any]:
            return await service.classify(await inputs.read_classify(request, settings))

        return JSONResponse(await service.with_timeout(work()))

    @app.post("/v1/embed", tags=["inference"], openapi_extra=oc.embed_body(settings),
              responses={200: {"model": schemas.EmbedResponse}, **schemas.ERRORS})
    async def embed(request: Request) -> JSONResponse:
        """L2-normalised float32 embeddings of images and/or texts.

        Multipart: file field `image` (repeatable), `texts` (repeatable). JSON: `{"images": [...], "texts": [...]}`.
        """
        async def work() -> dict[str, Any]:
            return await service.embed(await inputs.read_embed(request, settings))

        return JSONResponse(await service.with_timeout(work()))

    @app.get("/v1/model", tags=["model"], responses={401: schemas.ERRORS[401]})
    async def model() -> JSONResponse:
        """Model identity (id, weights SHA-256, fingerprint), provenance, golden digest, limits, batching."""
        return JSONResponse(service.model_document())

    @app.get("/healthz", tags=["health"])
    async def healthz() -> JSONResponse:
        """Liveness: the process answers. Says nothing about the model; see /readyz."""
        return JSONResponse({"status": "alive", "version": __version__})

    @app.get("/readyz", tags=["health"], responses={503: {"description": "not ready, with the reason"}})
    async def readyz() -> JSONResponse:
        """Readiness: model loaded and the golden probe embedding recomputes bitwise equal."""
        ok, detail = await service.self_check()
        if ok:
            return JSONResponse({"ready": True, **detail})
        body = {"ready": False, **detail, **error_body("NotReady", detail.get("problem", "not ready"))}
        return JSONResponse(body, status_code=503)


def _add_web_routes(app: FastAPI) -> None:
    app.mount("/static", StaticFiles(directory=WEB_DIR), name="static")

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(WEB_DIR / "index.html", media_type="text/html", headers=_PAGE_HEADERS)

    @app.get("/docs", include_in_schema=False)
    async def docs() -> FileResponse:
        return FileResponse(WEB_DIR / "docs.html", media_type="text/html", headers=_PAGE_HEADERS)
