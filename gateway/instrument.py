"""Per-request observation: a server span (continuing a caller's `traceparent`), so the gRPC
calls a route makes join one trace through ledger, rules and fraud; the Prometheus series;
and the /metrics endpoint on the API's own port."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from fastapi import FastAPI, Request, Response
from opentelemetry import propagate
from opentelemetry.trace import SpanKind
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest
from starlette.routing import Match

from pointmesh.telemetry import tracer

TRACER = tracer("pointmesh.gateway")
HTTP_REQUESTS = Counter(
    "pointmesh_http_requests_total", "Gateway requests, by route template, method and status.",
    ["route", "method", "status"],
)  # fmt: skip
HTTP_LATENCY = Histogram(
    "pointmesh_http_request_duration_seconds", "Gateway request latency, by route template.", ["route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)  # fmt: skip


def _route(request: Request) -> str:
    """The route template (/v1/members/{member_id}), so member ids never become labels."""
    route = request.scope.get("route")
    if route is not None:
        return str(getattr(route, "path", "unmatched"))
    for candidate in request.app.router.routes:
        match, _ = candidate.matches(request.scope)
        if match == Match.FULL:
            return str(getattr(candidate, "path", "unmatched"))
    return "unmatched"


def instrument(app: FastAPI) -> None:
    @app.middleware("http")
    async def measure(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        started = time.perf_counter()
        parent = propagate.extract(dict(request.headers))
        with TRACER.start_as_current_span(f"HTTP {request.method}", context=parent, kind=SpanKind.SERVER) as span:
            response = await call_next(request)
            route = _route(request)
            span.update_name(f"{request.method} {route}")
            span.set_attribute("http.route", route)
            span.set_attribute("http.response.status_code", response.status_code)
        HTTP_REQUESTS.labels(route, request.method, str(response.status_code)).inc()
        HTTP_LATENCY.labels(route).observe(time.perf_counter() - started)
        return response

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
