"""Per-request observation: a server span (continuing a caller's `traceparent`), so the gRPC
calls a route makes join one trace through ledger, rules and fraud; the Prometheus series;
and the /metrics endpoint on the API's own port."""

from __future__ import annotations

import logging
import time

from fastapi import FastAPI, Response
from opentelemetry import propagate
from opentelemetry.trace import SpanKind
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest
from starlette.routing import Match, Router
from starlette.types import ASGIApp, Message, Receive, Scope, Send

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


def _route(router: Router, scope: Scope) -> str:
    """The route template (/v1/members/{member_id}), so member ids never become labels."""
    route = scope.get("route")
    if route is not None:
        return str(getattr(route, "path", "unmatched"))
    for candidate in router.routes:
        match, _ = candidate.matches(scope)
        if match == Match.FULL:
            return str(getattr(candidate, "path", "unmatched"))
    return "unmatched"


log = logging.getLogger(__name__)
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"})


class _Measured:
    """Plain ASGI middleware rather than `@app.middleware("http")`: Starlette's
    BaseHTTPMiddleware runs each request through an extra task and memory streams."""

    def __init__(self, app: ASGIApp, router: Router) -> None:
        self.app = app
        self.router = router

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        # A label from the client's own method token would add a series per made-up method.
        method = scope["method"] if scope["method"] in _METHODS else "OTHER"
        status = [500]  # what an exception that escapes the app becomes

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        parent = propagate.extract(headers)
        with TRACER.start_as_current_span(f"HTTP {method}", context=parent, kind=SpanKind.SERVER) as span:
            try:
                await self.app(scope, receive, sending)
            except Exception:
                # Logged here, while the request's span is current, so the line carries its trace
                # id; the catch-all handler that answers 500 runs outside this middleware.
                log.exception("unhandled error on %s", scope.get("path", ""))
                raise
            finally:
                route = _route(self.router, scope)
                span.update_name(f"{method} {route}")
                span.set_attribute("http.route", route)
                span.set_attribute("http.response.status_code", status[0])
                HTTP_REQUESTS.labels(route, method, str(status[0])).inc()
                HTTP_LATENCY.labels(route).observe(time.perf_counter() - started)


def instrument(app: FastAPI) -> None:
    app.add_middleware(_Measured, router=app.router)

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
