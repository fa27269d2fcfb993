"""Prometheus metrics of the search API.

Requests are counted by route template (`/world/{path:path}`, not the path asked for) and
status, every status included (a validation 422, an unhandled 500); a path no route matches
is counted as `unmatched`, so no request can add a label value.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.04, 0.07, 0.1, 0.15, 0.25, 0.5, 1.0)
UNMATCHED = "unmatched"


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.stage = Histogram("loupe_stage_seconds", "latency per serving stage", ["stage"],
                               buckets=LATENCY_BUCKETS, registry=r)
        self.shard = Histogram("loupe_shard_seconds", "latency per shard answer", ["shard"],
                               buckets=LATENCY_BUCKETS, registry=r)
        self.requests = Counter("loupe_requests_total", "requests by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.hedges = Counter("loupe_hedges_fired_total", "hedged shard requests", registry=r)
        self.partial = Counter("loupe_partial_responses_total", "responses missing shards",
                               registry=r)
        self.index_age = Gauge("loupe_index_age_seconds", "age of the live index build",
                               registry=r)
        self.model_version = Gauge("loupe_model_version_info", "served model and index",
                                   ["model_version", "index_version"], registry=r)

    def served(self, model_version: str, index_version: str) -> None:
        self.model_version.clear()
        self.model_version.labels(model_version, index_version).set(1)


class RequestCounter:
    """ASGI middleware: one `loupe_requests_total` count per HTTP request (pure ASGI, so it
    adds no per-request task the way a `BaseHTTPMiddleware` would)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # an exception before the response started becomes a 500 outside

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")  # set by the router on the scope it was handed
            endpoint = getattr(route, "path", None) or UNMATCHED
            self.metrics.requests.labels(endpoint, str(status)).inc()
