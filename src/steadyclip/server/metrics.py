"""``GET /metrics``: Prometheus text exposition via ``prometheus_client``, one registry per app.

Series (all prefixed ``steadyclip_``):
    requests_total{route,method,status}      every HTTP answer, by route template (not raw path)
    request_duration_seconds{route}          latency histogram
    batch_rows                               rows per image micro-batch (histogram)
    queue_depth, ready, replicas             gauges: engine jobs waiting, last /readyz verdict, engine replicas
    integrity_failures_total                 requests/probes refused because the model changed
    overloaded_total                         requests refused with 429
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from steadyclip.server.gate import ASGIApp, Message, Receive, Scope, Send

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class _ServiceCollector(Collector):
    """Values the service and batcher already keep, read at scrape time."""

    def __init__(self, service: Any) -> None:
        self.service = service

    def collect(self) -> Iterator[Metric]:
        svc = self.service
        yield GaugeMetricFamily("steadyclip_queue_depth", "Engine jobs waiting for the worker thread",
                                value=svc.batcher.queue_depth)
        yield GaugeMetricFamily("steadyclip_ready", "1 when the last readiness probe recomputed the golden bitwise",
                                value=1.0 if svc.ready else 0.0)
        yield GaugeMetricFamily("steadyclip_replicas", "Engine replicas serving image forwards",
                                value=int(getattr(svc.engine, "replicas", 1)))
        yield CounterMetricFamily("steadyclip_integrity_failures", "Requests or probes refused: model changed",
                                  value=svc.integrity_failures)
        yield CounterMetricFamily("steadyclip_overloaded", "Requests refused with 429 (queue full)",
                                  value=svc.overloads)


class Metrics:
    """The app's registry and the instruments the middleware and batcher feed."""

    def __init__(self, service: Any) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("steadyclip_requests", "HTTP requests answered", ["route", "method", "status"],
                                registry=self.registry)
        self.latency = Histogram("steadyclip_request_duration_seconds", "Time to answer a request", ["route"],
                                 buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.batch_rows = Histogram("steadyclip_batch_rows", "Rows per image micro-batch forward",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=self.registry)
        self.registry.register(_ServiceCollector(service))

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class MetricsMiddleware:
    """Counts and times every HTTP answer, including those the gate refuses before routing."""

    def __init__(self, app: ASGIApp, *, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = {"code": 500}
        t0 = time.perf_counter()

        async def tracking_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"  # templates only: bounded labels
            self.metrics.requests.labels(route, str(scope.get("method", "")), str(status["code"])).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - t0)


__all__ = ["Metrics", "MetricsMiddleware"]
