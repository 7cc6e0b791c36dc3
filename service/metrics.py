"""Prometheus metrics of one app (own registry, so several apps can live in one process)."""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

STAGES = ("queue", "embed", "search", "rerank", "gather", "structural", "final", "total")
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ServiceMetrics:
    """Requests by route and status, latency per route, time per search stage, queue depth."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "vit_rerank_requests", "HTTP requests answered", ["method", "route", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "vit_rerank_request_seconds", "HTTP request latency", ["method", "route"],
            buckets=_LATENCY_BUCKETS, registry=self.registry,
        )
        self.stage = Histogram(
            "vit_rerank_stage_seconds", "time of each search stage", ["stage"],
            buckets=_LATENCY_BUCKETS, registry=self.registry,
        )
        self.queue_depth = Gauge("vit_rerank_queue_depth", "queries waiting for inference", registry=self.registry)
        self.batch_size = Histogram(
            "vit_rerank_batch_size", "queries per inference batch", buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=self.registry,
        )
        self.rejected = Counter("vit_rerank_queue_rejections", "queries refused with 503 (queue full)",
                                registry=self.registry)

    def observe_stages(self, timings_ms: dict[str, float]) -> None:
        for name in STAGES:
            if name in timings_ms:
                self.stage.labels(name).observe(timings_ms[name] / 1e3)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def route_name(scope: dict) -> str:
    """The label of a request: its route's template (never the raw path), a mount's prefix for the files it
    serves (``/static``), else ``unmatched`` (a 404 of routing)."""
    route = scope.get("route")
    if getattr(route, "path", None):
        return route.path
    if scope.get("endpoint") is not None and scope.get("root_path"):  # a mounted app, e.g. the static files
        return scope["root_path"]
    return "unmatched"


class MetricsMiddleware:
    """Pure ASGI middleware: counts and times every HTTP request by its route template."""

    def __init__(self, app: Any, metrics: ServiceMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            name = route_name(scope)
            method = scope.get("method", "")
            self.metrics.requests.labels(method, name, str(status)).inc()
            self.metrics.latency.labels(method, name).observe(time.perf_counter() - start)
