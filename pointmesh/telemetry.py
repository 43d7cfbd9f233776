"""OpenTelemetry tracing and Prometheus metrics set up once per process, shared by every service."""

from __future__ import annotations

import importlib
import json
import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path

from opentelemetry import trace
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter, SpanExportResult
from prometheus_client import Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)

METRICS_HOST_ENV = "POINTMESH_METRICS_HOST"
DEFAULT_METRICS_HOST = "127.0.0.1"
OTLP_ENDPOINT_ENV = "OTEL_EXPORTER_OTLP_ENDPOINT"
OTLP_PROTOCOL_ENV = "OTEL_EXPORTER_OTLP_PROTOCOL"
# Development and tests: every finished span as one JSON line appended to this file.
TRACE_FILE_ENV = "POINTMESH_TRACE_FILE"

RECONCILE_RUNS = Counter("pointmesh_reconcile_runs_total", "Background reconciliation passes of ledger_svc.")
RECONCILE_DIFFERENCES = Gauge(
    "pointmesh_reconcile_differences", "Differences the last reconciliation pass found and could not resolve."
)

RPC_REQUESTS = Counter(
    "pointmesh_rpc_requests_total",
    "gRPC calls handled, by final status code.",
    ["service", "method", "code"],
)

# From half a millisecond (a cache hit) to two seconds (past any sane deadline on the request path).
RPC_LATENCY_BUCKETS_SECONDS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.0,
)

RPC_LATENCY = Histogram(
    "pointmesh_rpc_latency_seconds",
    "Server-side gRPC call duration.",
    ["service", "method"],
    buckets=RPC_LATENCY_BUCKETS_SECONDS,
)

_lock = threading.Lock()
_tracing_service: str | None = None
_metrics_ports: set[int] = set()


class JsonLinesExporter(SpanExporter):
    """Spans as JSON lines in a file several processes may append to (one write per span), with
    their start and end (ns since the epoch, one clock on one machine) to find the slow hop."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = []
        for span in spans:
            ctx = span.get_span_context()
            parent = span.parent
            lines.append(json.dumps({
                "trace_id": f"{ctx.trace_id:032x}" if ctx else "", "span_id": f"{ctx.span_id:016x}" if ctx else "",
                "parent_id": f"{parent.span_id:016x}" if parent else "", "name": span.name,
                "service": span.resource.attributes.get(SERVICE_NAME, ""), "kind": span.kind.name,
                "start_ns": span.start_time, "end_ns": span.end_time, "status": span.status.status_code.name,
            }) + "\n")  # fmt: skip
        with self.path.open("a") as out:
            out.write("".join(lines))
        return SpanExportResult.SUCCESS


def _otlp_exporter() -> SpanExporter | None:
    """The OTLP exporter: gRPC ships with pointmesh; OTLP over HTTP needs its package installed."""
    http = os.environ.get(OTLP_PROTOCOL_ENV, "grpc").startswith("http")
    module_name = (
        "opentelemetry.exporter.otlp.proto.http.trace_exporter"
        if http
        else "opentelemetry.exporter.otlp.proto.grpc.trace_exporter"
    )
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        package = "opentelemetry-exporter-otlp-proto-" + ("http" if http else "grpc")
        log.warning(
            "%s is set but %s is not installed; traces stay in-process",
            OTLP_ENDPOINT_ENV,
            package,
            extra={"package": package},
        )
        return None
    exporter: SpanExporter = module.OTLPSpanExporter()
    return exporter


def _setup_tracing(service: str) -> None:
    global _tracing_service
    if _tracing_service is not None:
        if _tracing_service != service:
            log.debug("tracing already set up for %s; keeping it", _tracing_service)
        return
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: service}))
    if os.environ.get(OTLP_ENDPOINT_ENV):
        exporter = _otlp_exporter()
        if exporter is not None:
            provider.add_span_processor(BatchSpanProcessor(exporter))
    if os.environ.get(TRACE_FILE_ENV):
        provider.add_span_processor(SimpleSpanProcessor(JsonLinesExporter(Path(os.environ[TRACE_FILE_ENV]))))
    trace.set_tracer_provider(provider)
    _tracing_service = service


def _start_metrics_server(port: int) -> None:
    if port in _metrics_ports:
        return
    host = os.environ.get(METRICS_HOST_ENV, DEFAULT_METRICS_HOST)
    start_http_server(port, addr=host)
    _metrics_ports.add(port)
    log.info("metrics on http://%s:%d/metrics", host, port, extra={"metrics_port": port})


def setup_telemetry(service: str, metrics_port: int | None) -> None:
    """Installs the process-wide tracer provider (first caller names it) and serves /metrics.

    A metrics_port of None or 0 serves nothing, which is what tests and one-shot CLI commands want.
    """
    with _lock:
        _setup_tracing(service)
        if metrics_port:
            _start_metrics_server(metrics_port)


def tracer(name: str) -> trace.Tracer:
    """Returns a tracer from the process provider, so callers never import the SDK."""
    return trace.get_tracer(name)
