"""Spans reach an OTLP collector when OTEL_EXPORTER_OTLP_ENDPOINT names one: the gRPC exporter
ships with pointmesh, so every image can export. The collector here is a minimal OTLP trace
receiver on loopback (the collector is outside pointmesh: Jaeger, Tempo, an OTel Collector)."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from pointmesh import telemetry


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.names: list[str] = []

    async def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.aio.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        for resource in request.resource_spans:
            for scope in resource.scope_spans:
                self.names += [span.name for span in scope.spans]
        return trace_service_pb2.ExportTraceServiceResponse()


async def test_spans_are_exported_to_the_collector_the_environment_names(monkeypatch: pytest.MonkeyPatch) -> None:
    collector = Collector()
    server = grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    monkeypatch.setenv(telemetry.OTLP_ENDPOINT_ENV, f"http://127.0.0.1:{port}")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_INSECURE", "true")
    try:
        exporter = telemetry._otlp_exporter()
        assert exporter is not None, "the OTLP exporter is not installed"
        kept = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(kept))
        with provider.get_tracer("tests").start_as_current_span("purchase-recorded"):
            pass
        spans = kept.get_finished_spans()
        await asyncio.to_thread(exporter.export, spans)
        await asyncio.to_thread(exporter.shutdown)
    finally:
        await server.stop(grace=0)

    assert collector.names == ["purchase-recorded"]
