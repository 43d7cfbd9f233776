"""The one grpc.aio server bootstrap and the one client channel factory every pointmesh service uses.

Servers get tracing, metrics, call logs, health, reflection and a drain-then-stop shutdown; clients get
a default deadline, trace propagation and retries limited to the methods the caller declares idempotent.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from pointmesh import heap
from pointmesh.telemetry import RPC_LATENCY, RPC_REQUESTS, tracer

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 16 * 1024 * 1024
MAX_PENDING_CALLS = 20_000

_COMMON_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
)

SERVER_OPTIONS: tuple[tuple[str, int], ...] = (
    *_COMMON_OPTIONS,
    ("grpc.keepalive_time_ms", 60_000),
    # Below the clients' 30 s ping period, so idle clients are never punished with GOAWAY too_many_pings.
    ("grpc.http2.min_ping_interval_without_data_ms", 20_000),
    ("grpc.http2.max_ping_strikes", 2),
    # gRPC enables SO_REUSEPORT by default: a second server on a busy port would bind silently.
    ("grpc.so_reuseport", 0),
    # Calls that arrived while the event loop was busy wait for the server to take them. gRPC
    # cancels new ones once 1,000 wait (all past 3,000): a burst of 3,000 purchases at once on
    # one channel had ~730 answered CANCELLED before any code of ours saw them (a status no
    # client retries). They wait here instead, each within its caller's deadline; a waiting
    # call holds only its request (a few kB for a purchase).
    ("grpc.server.max_pending_requests", MAX_PENDING_CALLS),
    ("grpc.server.max_pending_requests_hard_limit", 2 * MAX_PENDING_CALLS),
)
# Clients resolve a service's DNS name again only when a connection closes, and keepalive keeps
# them open for ever: pods an autoscaler adds would get no calls. A connection is closed after
# this age (a GOAWAY: calls in flight finish within the grace, new ones go to a new connection
# after a fresh resolution), so new pods take their share within about a minute. The grace is
# longer than any deadline a call is given (a legacy import's 300 s); a WatchEvents stream open
# longer is ended, and its client resumes from the last position it saw.
CONNECTION_AGE_MS, CONNECTION_AGE_GRACE_MS = 60_000, 330_000

CLIENT_OPTIONS: tuple[tuple[str, int], ...] = (
    *_COMMON_OPTIONS,
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.enable_retries", 1),
    # Each channel its own subchannels: with round_robin, a subchannel shared from the process
    # pool that is backing off (a server that was on the same address before) would fail the
    # new channel's first calls at once instead of connecting.
    ("grpc.use_local_subchannel_pool", 1),
)

# gRPC silently caps maxAttempts at 5; refusing more keeps the configured number honest.
MAX_RETRY_ATTEMPTS = 5

# Server-side codes that mean the server failed, per the OpenTelemetry gRPC conventions.
_SERVER_ERROR_CODES = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)

_CODES_BY_VALUE = {code.value[0]: code for code in grpc.StatusCode}

_tracer = tracer(__name__)


def _split_method(method: str) -> tuple[str, str]:
    """Splits "/pkg.Service/Method" into its service and method names."""
    service, _, name = method.lstrip("/").rpartition("/")
    return service, name


def _as_status_code(raw: object) -> grpc.StatusCode | None:
    if raw is None or isinstance(raw, grpc.StatusCode):
        return raw
    if isinstance(raw, int):
        return _CODES_BY_VALUE.get(raw, grpc.StatusCode.UNKNOWN)
    return grpc.StatusCode.UNKNOWN


def _final_code(context: Any, error: BaseException | None) -> grpc.StatusCode:
    """Works out the status the client will see, from the servicer context and how the handler ended."""
    set_code = _as_status_code(getattr(context, "code", lambda: None)())
    if error is None:
        return set_code or grpc.StatusCode.OK
    if isinstance(error, grpc.aio.AbortError):
        return set_code or grpc.StatusCode.UNKNOWN
    if isinstance(error, asyncio.CancelledError | GeneratorExit):
        remaining = getattr(context, "time_remaining", lambda: None)()
        if remaining is not None and remaining <= 0:
            return grpc.StatusCode.DEADLINE_EXCEEDED
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.UNKNOWN


def _text_metadata(metadata: Iterable[Any] | None) -> dict[str, str]:
    """Keeps the ASCII entries of invocation metadata, which is where W3C trace headers travel."""
    carrier: dict[str, str] = {}
    for key, value in metadata or ():
        if isinstance(value, str):
            carrier[key] = value
    return carrier


@contextlib.contextmanager
def _attached(ctx: otel_context.Context) -> Iterator[None]:
    """Makes ctx current for one synchronous step or one await, never across a yield.

    A streaming handler can be closed from another task, where detaching a token set across a yield
    fails; attaching per step keeps every attach and detach in the same context.
    """
    token = otel_context.attach(ctx)
    try:
        yield
    finally:
        otel_context.detach(token)


@contextlib.contextmanager
def _observed(method: str, metadata: Iterable[Any] | None, context: Any) -> Iterator[otel_context.Context]:
    """Opens a server span in the caller's trace, yields its context, and records how the call ended."""
    service, name = _split_method(method)
    parent = propagate.extract(_text_metadata(metadata))
    span = _tracer.start_span(
        method.lstrip("/"),
        context=parent,
        kind=SpanKind.SERVER,
        attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": name},
    )
    span_context = trace.set_span_in_context(span, parent)
    started = time.perf_counter()
    error: BaseException | None = None
    try:
        yield span_context
    except BaseException as exc:
        error = exc
        raise
    finally:
        code = _final_code(context, error)
        elapsed_seconds = time.perf_counter() - started
        with _attached(span_context):
            _record_server_call(span, service, name, method, code, elapsed_seconds, error)
        span.end()


def _record_server_call(
    span: Span,
    service: str,
    name: str,
    method: str,
    code: grpc.StatusCode,
    elapsed_seconds: float,
    error: BaseException | None,
) -> None:
    RPC_REQUESTS.labels(service=service, method=name, code=code.name).inc()
    RPC_LATENCY.labels(service=service, method=name).observe(elapsed_seconds)
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    unexpected = code is grpc.StatusCode.UNKNOWN and error is not None
    if unexpected:
        span.record_exception(error)  # type: ignore[arg-type]
    if code in _SERVER_ERROR_CODES:
        span.set_status(Status(StatusCode.ERROR, code.name))
    fields = {"method": method, "code": code.name, "duration_ms": round(elapsed_seconds * 1000, 3)}
    if code is grpc.StatusCode.OK:
        log.debug("rpc %s %s", method, code.name, extra=fields)
    elif unexpected:
        log.error("rpc %s failed", method, extra=fields, exc_info=error)
    else:
        log.info("rpc %s %s", method, code.name, extra=fields)


Observe = Callable[[Any], contextlib.AbstractContextManager[otel_context.Context]]


def _wrap_unary_response(behaviour: Callable[..., Any], observe: Observe) -> Callable[..., Any]:
    if inspect.iscoroutinefunction(behaviour):

        async def call_async(request: Any, context: Any) -> Any:
            with observe(context) as span_context, _attached(span_context):
                return await behaviour(request, context)

        return call_async

    def call_sync(request: Any, context: Any) -> Any:
        with observe(context) as span_context, _attached(span_context):
            return behaviour(request, context)

    return call_sync


def _wrap_stream_response(behaviour: Callable[..., Any], observe: Observe) -> Callable[..., Any]:
    if inspect.isasyncgenfunction(behaviour):

        async def stream_async(request: Any, context: Any) -> AsyncIterator[Any]:
            with observe(context) as span_context:
                async with contextlib.aclosing(behaviour(request, context)) as responses:
                    while True:
                        with _attached(span_context):
                            try:
                                response = await anext(responses)
                            except StopAsyncIteration:
                                return
                        yield response

        return stream_async
    if inspect.iscoroutinefunction(behaviour):
        # A coroutine handler streams through context.write(); its shape matches the unary one.
        return _wrap_unary_response(behaviour, observe)

    def stream_sync(request: Any, context: Any) -> Iterator[Any]:
        with observe(context) as span_context:
            responses = iter(behaviour(request, context))
            while True:
                with _attached(span_context):
                    try:
                        response = next(responses)
                    except StopIteration:
                        return
                yield response

    return stream_sync


def _wrap_handler(handler: Any, details: Any) -> Any:
    """Rebuilds a method handler around the original behaviour, keeping its (de)serializers."""
    method: str = details.method
    metadata = details.invocation_metadata

    def observe(context: Any) -> contextlib.AbstractContextManager[otel_context.Context]:
        return _observed(method, metadata, context)

    codecs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(_wrap_unary_response(handler.unary_unary, observe), **codecs)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(_wrap_stream_response(handler.unary_stream, observe), **codecs)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(_wrap_unary_response(handler.stream_unary, observe), **codecs)
    if handler.stream_stream is not None:
        return grpc.stream_stream_rpc_method_handler(_wrap_stream_response(handler.stream_stream, observe), **codecs)
    return handler


class ServerInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Traces, counts, times and logs every call, so servicers only translate."""

    async def intercept_service(
        self,
        continuation: Callable[[Any], Awaitable[Any]],
        handler_call_details: Any,
    ) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        return _wrap_handler(handler, handler_call_details)


class GrpcServer:
    """A grpc.aio server with health, reflection and the shared interceptor, stopped by draining."""

    def __init__(
        self, name: str, address: str, *, grace_seconds: float = 10.0,
        connection_age_ms: int = CONNECTION_AGE_MS, connection_age_grace_ms: int = CONNECTION_AGE_GRACE_MS,
    ) -> None:  # fmt: skip
        self.name = name
        self.address = address
        self.grace_seconds = grace_seconds
        self.connection_age = (connection_age_ms, connection_age_grace_ms)
        self._registrations: list[tuple[Callable[[grpc.aio.Server], None], str]] = []
        self._on_stop: list[Callable[[], Awaitable[None]]] = []
        self._server: grpc.aio.Server | None = None
        self._health: health.aio.HealthServicer | None = None
        self._port: int | None = None
        self._stop_task: asyncio.Task[None] | None = None
        self._stopped = asyncio.Event()

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError(f"{self.name}: server not started")
        return self._port

    @property
    def service_names(self) -> list[str]:
        return [service for _, service in self._registrations]

    def add_service(self, register: Callable[[grpc.aio.Server], None], full_service_name: str) -> None:
        """Queues a servicer registration; the health and reflection entries follow from the name."""
        if self._server is not None:
            raise RuntimeError(f"{self.name}: add services before start()")
        self._registrations.append((register, full_service_name))

    def on_stop(self, cb: Callable[[], Awaitable[None]]) -> None:
        """Registers cleanup that runs after the drain, last registered first, like an ExitStack."""
        self._on_stop.append(cb)

    async def start(self) -> int:
        """Binds, registers everything and starts serving; returns the bound port (useful with ":0")."""
        if self._server is not None or self._stop_task is not None:
            raise RuntimeError(f"{self.name}: start() called twice")
        age, grace = self.connection_age
        options = [*SERVER_OPTIONS, ("grpc.max_connection_age_ms", age), ("grpc.max_connection_age_grace_ms", grace)]
        server = grpc.aio.server(interceptors=[ServerInterceptor()], options=options)
        for register, _ in self._registrations:
            register(server)
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        for service in [*self.service_names, health.OVERALL_HEALTH]:
            await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
        reflection.enable_server_reflection([*self.service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
        port: int = server.add_insecure_port(self.address)
        if not port:
            raise RuntimeError(f"{self.name}: could not bind {self.address}")
        heap.settle()  # startup is done; no request has made garbage yet
        await server.start()
        self._server, self._health, self._port = server, health_servicer, port
        log.info("%s serving on port %d", self.name, port, extra={"address": self.address, "port": port})
        return port

    async def stop(self, grace: float | None = None) -> None:
        """Announces NOT_SERVING, drains in-flight calls for up to `grace` seconds, then runs cleanups.

        Safe to call more than once or concurrently; every caller waits for the same shutdown. Calls
        that never end by themselves (health Watch, subscriptions) hold the drain until grace expires.
        """
        await asyncio.shield(self._begin_stop(self.grace_seconds if grace is None else grace))

    def _begin_stop(self, grace: float) -> asyncio.Task[None]:
        if self._stop_task is None:
            self._stop_task = asyncio.get_running_loop().create_task(self._shutdown(grace))
        return self._stop_task

    async def _shutdown(self, grace: float) -> None:
        log.info("%s stopping, grace %.1fs", self.name, grace, extra={"grace_seconds": grace})
        if self._health is not None:
            await self._health.enter_graceful_shutdown()
        if self._server is not None:
            await self._server.stop(grace)
        for cb in reversed(self._on_stop):
            try:
                await cb()
            except Exception:
                log.exception("%s: on-stop callback %r failed", self.name, cb)
        self._stopped.set()
        log.info("%s stopped", self.name)

    async def wait_stopped(self) -> None:
        """Returns once stop() has finished, for callers that started the server themselves."""
        await self._stopped.wait()

    async def serve_until_signal(self) -> None:
        """Serves until SIGTERM or SIGINT, then stops gracefully; starts the server if needed."""
        if self._server is None:
            await self.start()
        loop = asyncio.get_running_loop()
        signals = (signal.SIGTERM, signal.SIGINT)
        previous = {sig: signal.getsignal(sig) for sig in signals}
        for sig in signals:
            loop.add_signal_handler(sig, self._on_signal, sig)
        try:
            await self._stopped.wait()
        finally:
            for sig in signals:
                loop.remove_signal_handler(sig)
                signal.signal(sig, previous[sig])

    def _on_signal(self, sig: signal.Signals) -> None:
        log.info("%s received %s", self.name, sig.name)
        self._begin_stop(self.grace_seconds)


def _method_config_name(method: str) -> dict[str, str]:
    service, name = _split_method(method)
    if not method.startswith("/") or not service or not name or "/" in service:
        raise ValueError(f"expected a method like '/pointmesh.v1.LedgerService/GetBalance', got {method!r}")
    return {"service": service, "method": name}


def service_config(idempotent_methods: Sequence[str], max_attempts: int) -> str:
    """Builds the JSON service config that retries UNAVAILABLE only for the named idempotent methods."""
    if not 1 <= max_attempts <= MAX_RETRY_ATTEMPTS:
        raise ValueError(f"max_attempts must be between 1 and {MAX_RETRY_ATTEMPTS}, got {max_attempts}")
    names = [_method_config_name(method) for method in idempotent_methods]
    # Round robin over every address the name resolves to: behind a Kubernetes headless
    # Service each pod is an address, so calls spread per call, not per connection.
    config: dict[str, Any] = {"methodConfig": [], "loadBalancingConfig": [{"round_robin": {}}]}
    if names and max_attempts > 1:
        retry_policy = {
            "maxAttempts": max_attempts,
            "initialBackoff": "0.05s",
            "maxBackoff": "1s",
            "backoffMultiplier": 2,
            "retryableStatusCodes": ["UNAVAILABLE"],
        }
        config["methodConfig"].append({"name": names, "retryPolicy": retry_policy})
        # Stops retrying when most calls to a server fail, so an outage is not multiplied by retries.
        config["retryThrottling"] = {"maxTokens": 100, "tokenRatio": 0.1}
    return json.dumps(config)


class _ClientHooks:
    """What every client call gets: a default deadline, a client span and a traceparent header."""

    def __init__(self, default_timeout_seconds: float | None) -> None:
        self._default_timeout_seconds = default_timeout_seconds
        self._pending: set[asyncio.Task[None]] = set()

    def prepare(self, details: Any, *, apply_default_timeout: bool) -> tuple[Any, Span]:
        method = details.method.decode() if isinstance(details.method, bytes) else str(details.method)
        service, name = _split_method(method)
        span = _tracer.start_span(
            method.lstrip("/"),
            kind=SpanKind.CLIENT,
            attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": name},
        )
        carrier: dict[str, str] = {}
        propagate.inject(carrier, context=trace.set_span_in_context(span))
        metadata = grpc.aio.Metadata(*(details.metadata or ()))
        for key, value in carrier.items():
            metadata[key] = value
        timeout = details.timeout
        if timeout is None and apply_default_timeout:
            timeout = self._default_timeout_seconds
        new_details = grpc.aio.ClientCallDetails(
            details.method, timeout, metadata, details.credentials, details.wait_for_ready
        )
        return new_details, span

    async def invoke(
        self, continuation: Callable[[Any, Any], Awaitable[Any]], details: Any, request: Any, *, unary: bool
    ) -> Any:
        new_details, span = self.prepare(details, apply_default_timeout=unary)
        try:
            call = await continuation(new_details, request)
        except BaseException as exc:
            span.record_exception(exc)
            span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
            span.end()
            raise
        loop = asyncio.get_running_loop()
        call.add_done_callback(lambda done: self._end_span_later(loop, done, span))
        return call

    def _end_span_later(self, loop: asyncio.AbstractEventLoop, call: Any, span: Span) -> None:
        # In grpc.aio a call's code() is a coroutine even once the call is done, so a task reads it.
        task = loop.create_task(self._end_span(call, span))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _end_span(self, call: Any, span: Span) -> None:
        try:
            code = await call.code()
            span.set_attribute("rpc.grpc.status_code", code.value[0])
            if code is not grpc.StatusCode.OK:
                span.set_status(Status(StatusCode.ERROR, code.name))
        finally:
            span.end()


class _UnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    def __init__(self, hooks: _ClientHooks) -> None:
        self._hooks = hooks

    async def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return await self._hooks.invoke(continuation, client_call_details, request, unary=True)


class _UnaryStream(grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[misc]
    def __init__(self, hooks: _ClientHooks) -> None:
        self._hooks = hooks

    async def intercept_unary_stream(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return await self._hooks.invoke(continuation, client_call_details, request, unary=False)


class _StreamUnary(grpc.aio.StreamUnaryClientInterceptor):  # type: ignore[misc]
    def __init__(self, hooks: _ClientHooks) -> None:
        self._hooks = hooks

    async def intercept_stream_unary(self, continuation: Any, client_call_details: Any, request_iterator: Any) -> Any:
        return await self._hooks.invoke(continuation, client_call_details, request_iterator, unary=True)


class _StreamStream(grpc.aio.StreamStreamClientInterceptor):  # type: ignore[misc]
    def __init__(self, hooks: _ClientHooks) -> None:
        self._hooks = hooks

    async def intercept_stream_stream(self, continuation: Any, client_call_details: Any, request_iterator: Any) -> Any:
        return await self._hooks.invoke(continuation, client_call_details, request_iterator, unary=False)


def client_channel(
    target: str,
    *,
    idempotent_methods: Sequence[str] = (),
    default_timeout_seconds: float = 5.0,
    max_attempts: int = 4,
) -> grpc.aio.Channel:
    """Opens an insecure aio channel with deadlines, tracing, and retries for the idempotent methods.

    Streaming-response calls get no default deadline, because a subscription may legitimately last.
    """
    hooks = _ClientHooks(default_timeout_seconds)
    options = [*CLIENT_OPTIONS, ("grpc.service_config", service_config(idempotent_methods, max_attempts))]
    # grpc.aio files each interceptor under its first matching kind only, so each kind needs its own.
    interceptors = [_UnaryUnary(hooks), _UnaryStream(hooks), _StreamUnary(hooks), _StreamStream(hooks)]
    return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)
