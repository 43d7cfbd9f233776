"""The shared gRPC plumbing, exercised over real loopback sockets: health, reflection, drain, deadlines,
retries, trace propagation and per-call metrics."""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from prometheus_client import REGISTRY

from pointmesh.rpc import GrpcServer, client_channel, service_config
from pointmesh.telemetry import setup_telemetry, tracer

ECHO_SERVICE = "pointmesh.test.Echo"


def path(method: str) -> str:
    return f"/{ECHO_SERVICE}/{method}"


@dataclass
class EchoState:
    """What the test handlers saw, so tests can assert on the server side of each call."""

    attempts: Counter[str] = field(default_factory=Counter)
    slow_started: asyncio.Event = field(default_factory=asyncio.Event)


def echo_handler(state: EchoState) -> grpc.GenericRpcHandler:
    async def echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return request

    async def slow(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        state.slow_started.set()
        await asyncio.sleep(0.5)
        return request

    async def sleep(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        await asyncio.sleep(float(request))
        return request

    def flaky(name: str) -> Any:
        async def handle(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            state.attempts[name] += 1
            if state.attempts[name] <= 2:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "not yet")
            return request

        return handle

    async def trace_ids(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        span_context = trace.get_current_span().get_span_context()
        return f"{span_context.trace_id:032x}:{span_context.span_id:016x}".encode()

    async def missing(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        await context.abort(grpc.StatusCode.NOT_FOUND, "no such thing")
        raise AssertionError("abort returned")

    async def crash(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        raise RuntimeError("handler bug")

    async def count(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        for i in range(int(request)):
            yield str(i).encode()

    async def total(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> bytes:
        return str(sum([int(r) async for r in requests])).encode()

    async def upper(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        async for request in requests:
            yield request.upper()

    handlers = {
        "Echo": grpc.unary_unary_rpc_method_handler(echo),
        "Slow": grpc.unary_unary_rpc_method_handler(slow),
        "Sleep": grpc.unary_unary_rpc_method_handler(sleep),
        "Flaky": grpc.unary_unary_rpc_method_handler(flaky("Flaky")),
        "FlakyUnlisted": grpc.unary_unary_rpc_method_handler(flaky("FlakyUnlisted")),
        "TraceIds": grpc.unary_unary_rpc_method_handler(trace_ids),
        "Missing": grpc.unary_unary_rpc_method_handler(missing),
        "Crash": grpc.unary_unary_rpc_method_handler(crash),
        "Count": grpc.unary_stream_rpc_method_handler(count),
        "Total": grpc.stream_unary_rpc_method_handler(total),
        "Upper": grpc.stream_stream_rpc_method_handler(upper),
    }
    return grpc.method_handlers_generic_handler(ECHO_SERVICE, handlers)


async def start_echo_server(grace_seconds: float = 5.0) -> tuple[GrpcServer, EchoState]:
    state = EchoState()
    server = GrpcServer("echo", "127.0.0.1:0", grace_seconds=grace_seconds)
    handler = echo_handler(state)
    server.add_service(lambda s: s.add_generic_rpc_handlers((handler,)), ECHO_SERVICE)
    await server.start()
    return server, state


def requests_total(method: str, code: str) -> float:
    labels = {"service": ECHO_SERVICE, "method": method, "code": code}
    return REGISTRY.get_sample_value("pointmesh_rpc_requests_total", labels) or 0.0


@pytest.fixture(scope="module")
def spans() -> Iterator[InMemorySpanExporter]:
    setup_telemetry("plumbing-tests", None)
    provider = trace.get_tracer_provider()
    assert isinstance(provider, TracerProvider)
    exporter = InMemorySpanExporter()
    processor = SimpleSpanProcessor(exporter)
    provider.add_span_processor(processor)
    yield exporter
    # The global provider keeps its processors for good: a processor shut down here would log
    # "already shutdown" at every later span of the session (and into tests that read the log).
    # A stopped exporter takes later spans silently instead.
    exporter.clear()
    exporter.shutdown()


@pytest.fixture(scope="module")
async def echo(spans: InMemorySpanExporter) -> AsyncIterator[tuple[GrpcServer, EchoState]]:
    server, state = await start_echo_server()
    yield server, state
    await server.stop(grace=0)


async def test_health_reports_serving_for_registered_service_and_overall(
    echo: tuple[GrpcServer, EchoState],
) -> None:
    server, _ = echo
    async with client_channel(f"127.0.0.1:{server.port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for name in (ECHO_SERVICE, ""):
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=name))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await stub.Check(health_pb2.HealthCheckRequest(service="pointmesh.test.Nope"))
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND


async def test_reflection_lists_registered_health_and_reflection_services(
    echo: tuple[GrpcServer, EchoState],
) -> None:
    server, _ = echo
    async with client_channel(f"127.0.0.1:{server.port}") as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        replies = [reply async for reply in stub.ServerReflectionInfo(iter([request]))]
    names = {service.name for service in replies[0].list_services_response.service}
    assert names == {
        ECHO_SERVICE,
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    }


async def test_stop_announces_not_serving_to_watchers_then_refuses_calls() -> None:
    server, _ = await start_echo_server()
    async with client_channel(f"127.0.0.1:{server.port}") as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=ECHO_SERVICE))
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
        stopping = asyncio.create_task(server.stop(grace=5))
        assert (await asyncio.wait_for(watch.read(), 2)).status == health_pb2.HealthCheckResponse.NOT_SERVING
        watch.cancel()
        await asyncio.wait_for(stopping, 3)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_stop_drains_in_flight_call_then_new_calls_are_unavailable() -> None:
    server, state = await start_echo_server()
    cleaned_up: list[str] = []

    async def cleanup() -> None:
        cleaned_up.append("done")

    server.on_stop(cleanup)
    async with client_channel(f"127.0.0.1:{server.port}") as channel:
        in_flight = asyncio.ensure_future(channel.unary_unary(path("Slow"))(b"keep me"))
        await asyncio.wait_for(state.slow_started.wait(), 2)
        started = time.monotonic()
        await server.stop(grace=5)
        assert time.monotonic() - started < 2.0, "drain should end when the last call does, not at grace"
        # The server has sent the reply by now; the client side may still be reading it.
        assert await asyncio.wait_for(in_flight, 1) == b"keep me"
        assert cleaned_up == ["done"]
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await channel.unary_unary(path("Echo"))(b"too late", timeout=1)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_sigterm_during_serve_until_signal_stops_gracefully() -> None:
    server, _ = await start_echo_server(grace_seconds=1)
    serving = asyncio.create_task(server.serve_until_signal())
    await asyncio.sleep(0)
    assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL, "loop handler not installed"
    signal.raise_signal(signal.SIGTERM)
    await asyncio.wait_for(serving, 3)
    async with client_channel(f"127.0.0.1:{server.port}") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await channel.unary_unary(path("Echo"))(b"x", timeout=1)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_default_deadline_applies_when_caller_gives_none(echo: tuple[GrpcServer, EchoState]) -> None:
    server, _ = echo
    async with client_channel(f"127.0.0.1:{server.port}", default_timeout_seconds=0.2) as channel:
        sleep = channel.unary_unary(path("Sleep"))
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as late:
            await sleep(b"1.0")
        assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - started < 0.9
        assert await sleep(b"0.3", timeout=2) == b"0.3", "an explicit timeout wins over the default"


async def test_a_burst_of_calls_past_grpcs_pending_limit_is_served_not_cancelled(
    echo: tuple[GrpcServer, EchoState],
) -> None:
    """3,000 calls at once on one channel, each held 0.3 s by the handler: every one answers.
    With gRPC's own limit on calls waiting for the server to take them (1,000, all past 3,000),
    some 700 ended CANCELLED before reaching a handler."""
    server, _ = echo
    async with client_channel(f"127.0.0.1:{server.port}", default_timeout_seconds=60) as channel:
        sleep = channel.unary_unary(path("Sleep"))
        assert await sleep(b"0") == b"0"  # connected: the burst goes on one open connection
        answers = await asyncio.gather(*(sleep(b"0.3") for _ in range(3_000)), return_exceptions=True)
    failed = [a for a in answers if isinstance(a, BaseException)]
    assert not failed, f"{len(failed)} of 3000 failed, the first: {failed[0]!r}"


async def test_retries_only_listed_idempotent_methods(echo: tuple[GrpcServer, EchoState]) -> None:
    server, state = echo
    channel = client_channel(f"127.0.0.1:{server.port}", idempotent_methods=[path("Flaky")])
    async with channel:
        assert await channel.unary_unary(path("Flaky"))(b"ok") == b"ok"
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await channel.unary_unary(path("FlakyUnlisted"))(b"ok")
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    assert state.attempts["Flaky"] == 3
    assert state.attempts["FlakyUnlisted"] == 1


def test_service_config_rejects_bad_method_names_and_attempts() -> None:
    with pytest.raises(ValueError, match="expected a method"):
        service_config(["pointmesh.v1.LedgerService.GetBalance"], 4)
    with pytest.raises(ValueError, match="max_attempts"):
        service_config(["/pointmesh.v1.LedgerService/GetBalance"], 6)


def _finished(spans: InMemorySpanExporter, name: str, kind: SpanKind) -> ReadableSpan:
    matches = [s for s in spans.get_finished_spans() if s.name == name and s.kind is kind]
    assert len(matches) == 1, f"expected one {kind.name} span {name}, got {len(matches)}"
    return matches[0]


async def test_client_span_trace_reaches_server_handler_as_parent(
    echo: tuple[GrpcServer, EchoState], spans: InMemorySpanExporter
) -> None:
    server, _ = echo
    spans.clear()
    async with client_channel(f"127.0.0.1:{server.port}") as channel:
        with tracer("tests").start_as_current_span("checkout") as caller:
            reply = await channel.unary_unary(path("TraceIds"))(b"")
        await asyncio.sleep(0.05)
    trace_hex, span_hex = reply.decode().split(":")
    assert int(trace_hex, 16) == caller.get_span_context().trace_id
    name = f"{ECHO_SERVICE}/TraceIds"
    client = _finished(spans, name, SpanKind.CLIENT)
    served = _finished(spans, name, SpanKind.SERVER)
    assert served.context is not None and client.context is not None and client.parent is not None
    assert served.context.span_id == int(span_hex, 16), "the handler runs inside the server span"
    assert served.parent is not None and served.parent.span_id == client.context.span_id
    assert client.parent.span_id == caller.get_span_context().span_id


async def test_every_handler_kind_is_counted_with_its_final_code(echo: tuple[GrpcServer, EchoState]) -> None:
    server, _ = echo
    expected = {
        ("Echo", "OK"): 1,
        ("Count", "OK"): 1,
        ("Total", "OK"): 2,
        ("Upper", "OK"): 1,
        ("Missing", "NOT_FOUND"): 1,
        ("Crash", "UNKNOWN"): 1,
    }
    before = {key: requests_total(*key) for key in expected}
    async with client_channel(f"127.0.0.1:{server.port}") as channel:
        assert await channel.unary_unary(path("Echo"))(b"a") == b"a"
        assert [r async for r in channel.unary_stream(path("Count"))(b"3")] == [b"0", b"1", b"2"]
        assert await channel.stream_unary(path("Total"))(iter([b"1", b"2", b"3"])) == b"6"
        writer = channel.stream_unary(path("Total"))()
        for value in (b"4", b"5"):
            await writer.write(value)
        await writer.done_writing()
        assert await writer == b"9", "the write() API must not deadlock behind the interceptor"
        assert [r async for r in channel.stream_stream(path("Upper"))(iter([b"a", b"b"]))] == [b"A", b"B"]
        for method, code in (("Missing", grpc.StatusCode.NOT_FOUND), ("Crash", grpc.StatusCode.UNKNOWN)):
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await channel.unary_unary(path(method))(b"")
            assert failed.value.code() == code
    after = {key: requests_total(*key) for key in expected}
    assert {key: after[key] - before[key] for key in expected} == expected
    latency = REGISTRY.get_sample_value(
        "pointmesh_rpc_latency_seconds_count", {"service": ECHO_SERVICE, "method": "Upper"}
    )
    assert latency is not None and latency >= 1


async def test_cancelled_server_stream_counts_cancelled_and_keeps_trace_context_sane(
    echo: tuple[GrpcServer, EchoState], caplog: pytest.LogCaptureFixture
) -> None:
    server, _ = echo
    before = requests_total("Count", "CANCELLED")
    async with client_channel(f"127.0.0.1:{server.port}") as channel:
        call = channel.unary_stream(path("Count"))(b"100000", timeout=5)
        assert await call.read() == b"0"
        call.cancel()
        for _ in range(100):
            if requests_total("Count", "CANCELLED") > before:
                break
            await asyncio.sleep(0.01)
    assert requests_total("Count", "CANCELLED") == before + 1
    assert not [r for r in caplog.records if "detach" in r.getMessage()]


async def test_a_connection_is_closed_after_its_age_so_clients_resolve_the_service_again() -> None:
    """Keepalive would hold a connection open for ever, and a client resolves DNS again only
    when one closes: pods an autoscaler adds would get no calls. Past its age the server ends
    the connection, and the client's calls go on over a new one (another client port)."""
    peers: list[str] = []

    async def who(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        peers.append(context.peer())
        return request

    server = GrpcServer("peers", "127.0.0.1:0", connection_age_ms=300, connection_age_grace_ms=1_000)
    handler = grpc.method_handlers_generic_handler("test.Peers", {"Who": grpc.unary_unary_rpc_method_handler(who)})
    server.add_service(lambda s: s.add_generic_rpc_handlers((handler,)), "test.Peers")
    await server.start()
    try:
        async with client_channel(f"127.0.0.1:{server.port}") as channel:
            call = channel.unary_unary("/test.Peers/Who")
            for _ in range(30):  # three seconds of calls, one every 0.1 s
                assert await call(b"x", timeout=5) == b"x"
                await asyncio.sleep(0.1)
    finally:
        await server.stop(grace=0)

    assert len(set(peers)) > 1, f"every call came over one connection: {set(peers)}"
