"""Prometheus metrics and the request log of the search API.

Requests are counted by route template (`/world/{path:path}`, not the path asked for) and
status, every status included (a validation 422, an unhandled 500); a path no route matches
is counted as `unmatched`, so no request can add a label value. Each request also writes
one JSON line to the `loupe.requests` logger: request id (the client's `X-Request-ID` when
it is a plain token, else a new one; echoed in the response and carried by the search
result), route template, status, milliseconds, and the model and index versions serving.
Headers, query strings and bodies are never logged (the admin token travels in a header).
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.04, 0.07, 0.1, 0.15, 0.25, 0.5, 1.0)
UNMATCHED = "unmatched"
REQUEST_ID_HEADER = b"x-request-id"
_CLIENT_REQUEST_ID = re.compile(rb"[A-Za-z0-9_.-]{1,64}")
request_log = logging.getLogger("loupe.requests")


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
        self.replicas_up = Gauge("loupe_shard_replicas_up", "shard replicas answering /healthz",
                                 ["shard"], registry=r)
        self.shards_missing = Gauge("loupe_shards_missing", "shards with no replica answering",
                                    registry=r)
        self.in_flight = Gauge("loupe_requests_in_flight",
                               "searches and detects holding an admission slot", registry=r)
        self.shed = Counter("loupe_requests_shed_total",
                            "searches and detects refused (503) by admission control",
                            registry=r)
        self.model_version = Gauge("loupe_model_version_info", "served model and index",
                                   ["model_version", "index_version"], registry=r)

    def served(self, model_version: str, index_version: str) -> None:
        self.model_version.clear()
        self.model_version.labels(model_version, index_version).set(1)


def _request_id(scope: Scope) -> str:
    for name, value in scope.get("headers", ()):
        if name == REQUEST_ID_HEADER and _CLIENT_REQUEST_ID.fullmatch(value):
            return value.decode()
    return uuid.uuid4().hex


class RequestTelemetry:
    """ASGI middleware: per HTTP request, one `loupe_requests_total` count and one JSON log
    line (see the module doc); the request id is `request.state.request_id` to the routes.
    Pure ASGI, so it adds no per-request task the way a `BaseHTTPMiddleware` would.
    `serving()` names the (model_version, index_version) live now, or None."""

    def __init__(self, app: ASGIApp, metrics: Metrics,
                 serving: Callable[[], tuple[str, str] | None] = lambda: None) -> None:
        self.app, self.metrics, self.serving = app, metrics, serving

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # an exception before the response started becomes a 500 outside
        request_id = _request_id(scope)
        scope.setdefault("state", {})["request_id"] = request_id
        t0 = time.perf_counter()

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()),
                                      (REQUEST_ID_HEADER, request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")  # set by the router on the scope it was handed
            endpoint = getattr(route, "path", None) or UNMATCHED
            self.metrics.requests.labels(endpoint, str(status)).inc()
            if request_log.isEnabledFor(logging.INFO):
                serving = self.serving()
                request_log.info(json.dumps({
                    "ts": datetime.now(UTC).isoformat(timespec="milliseconds"),
                    "request_id": request_id, "method": scope.get("method"),
                    "route": endpoint, "status": status,
                    "ms": round((time.perf_counter() - t0) * 1000, 2),
                    "model_version": serving[0] if serving else None,
                    "index_version": serving[1] if serving else None}))
