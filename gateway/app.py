"""Wires the gateway from Settings: gRPC clients, API keys, member tokens, the live hub, routes.

The one place the FastAPI app is built, so tests run exactly what `pointmesh gateway serve`
runs (uvicorn on a real port).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway import openapi, problems
from gateway.auth import MemberTokens, member_token_secret
from gateway.deps import Gateway
from gateway.instrument import instrument
from gateway.keys import KeyStore, RedisKeyRecords
from gateway.live import LiveHub
from gateway.routes import backoffice, game, health, legacy, live, members, ops, points, program, purchases
from pointmesh import clients, event_loop, heap
from pointmesh.clients import ledger_stub, rules_stub
from pointmesh.clock import Clock, SystemClock
from pointmesh.config import Settings
from pointmesh.events import bus_redis, open_bus

log = logging.getLogger(__name__)
# Far above any request the API takes (a purchase of 500 lines is some 100 KB).
MAX_BODY_BYTES = 1024 * 1024
DESCRIPTION = """REST and websockets for every channel of a pointmesh loyalty program.

Authenticate with `Authorization: Bearer <API key>` (a channel's key, with scopes, bound to its
channel and stores) or a member token (reads only its own member). Every POST takes an
`Idempotency-Key`: a retry with the same key and body gets the original answer (a purchase: the
purchase as it stands now, returns since included), another body gets 409. Errors are RFC 9457 problem+json with the field at fault.
"""


def _log_if_failed(task: asyncio.Task[None]) -> None:
    """Said when it happens, not at shutdown: a dead hub means no live updates for anyone."""
    if not task.cancelled() and task.exception() is not None:
        log.error("live updates stopped", exc_info=task.exception())


def body_limit(path: str) -> tuple[int, problems.Problem]:
    """The most bytes a request to `path` may carry, and what a larger one is told: the legacy
    upload's own bound (a multipart body, read to disk once the caller's key may upload),
    the webhook's (told as its route tells it, docs/legacy.md: 400, field `body`), else 1 MiB."""
    if path == "/v1/legacy/imports":
        return legacy.MAX_UPLOAD_BYTES, problems.too_large(legacy.MAX_UPLOAD_BYTES)
    if path.startswith("/v1/legacy/webhooks/"):
        limit = legacy.MAX_WEBHOOK_BYTES
        return limit, problems.bad_request("body", f"larger than {limit} bytes")
    return MAX_BODY_BYTES, problems.too_large(MAX_BODY_BYTES)


def bounded_body(app: ASGIApp) -> ASGIApp:
    """Refuses a body past its path's limit (body_limit) before the app parses it (FastAPI reads
    the whole body before any dependency, so before the caller is authenticated): by its
    Content-Length before reading a byte, or as a chunked body arrives. The refusal is sent
    without closing the connection; the server drops whatever of the body still arrives."""

    async def bounded(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        path = scope.get("path", "")
        limit, refusal = body_limit(path)
        declared = Headers(scope=scope).get("content-length", "")
        length = declared.lstrip("0") or "0"  # compared by its digits first: int() of any length is not free
        if declared.isascii() and declared.isdigit() and (len(length) > len(str(limit)) or int(length) > limit):
            response = JSONResponse(refusal.body(path), refusal.status, refusal.headers, problems.MEDIA_TYPE)
            await response(scope, receive, send)
            return
        size = 0

        async def counted() -> Message:
            nonlocal size
            message = await receive()
            if message["type"] == "http.request":
                size += len(message.get("body", b""))
                if size > limit:
                    # FastAPI passes an HTTPException on from its body parsing (any other error
                    # becomes a 400); the webhook reads its body itself, so its Problem arrives.
                    raise problems.BodyTooLarge(limit) if refusal.status == 413 else refusal
            return message

        await app(scope, counted, send)

    return bounded


def key_store(settings: Settings) -> KeyStore:
    """The API keys every replica must agree on: Redis when several gateways serve (Kubernetes)."""
    if settings.gateway_key_store == "redis":
        return KeyStore(RedisKeyRecords(settings.redis_url, timeout_seconds=settings.redis_timeout_seconds))
    return KeyStore(settings.data_dir / "gateway" / "keys.db")


def create_app(settings: Settings, *, clock: Clock | None = None) -> FastAPI:
    """Call on the event loop that will serve it (see `serve`)."""
    clock = clock or SystemClock()
    redis = bus_redis(settings)
    gw = Gateway(
        settings=settings,
        ledger=ledger_stub(settings.ledger_addr, default_timeout_seconds=settings.gateway_deadline_seconds),
        rules=rules_stub(settings.rules_addr, default_timeout_seconds=settings.gateway_deadline_seconds),
        keys=key_store(settings),
        tokens=MemberTokens(
            member_token_secret(settings), timedelta(seconds=settings.member_token_ttl_seconds), clock.now
        ),
        hub=LiveHub(open_bus(settings, redis), settings.live_queue_max),
        clock=clock,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        follower = asyncio.create_task(gw.hub.run(), name="live-hub")
        follower.add_done_callback(_log_if_failed)
        heap.settle()
        try:
            yield
        finally:
            follower.cancel()
            # A hub that died was logged then; its error must not stop the rest of the shutdown.
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await follower
            await redis.aclose()
            await gw.keys.aclose()
            await clients.close(gw.ledger)
            await clients.close(gw.rules)

    app = FastAPI(title="pointmesh gateway", version="1", description=DESCRIPTION, lifespan=lifespan, **_own_tracing())
    app.add_middleware(bounded_body)  # inside instrument's: a 413 is measured too
    instrument(app)
    app.state.gateway = gw
    problems.install(app)
    openapi.install(app, body_limit)
    # Legacy imports answer a service's limits as an outage (503); live and health call none that way.
    no_429 = (legacy, live, health)
    for module in (members, purchases, points, program, legacy, live, health, ops, backoffice, game):
        app.include_router(module.router, responses=None if module in no_429 else openapi.CALLS_A_SERVICE)
    return app


# Clients send live sockets nothing but `{"type": "ping"}` (16 bytes); other frames are ignored,
# and one over this closes the socket (1009) rather than being buffered whole (uvicorn's default
# allows 16 MiB per frame and connection).
WS_MAX_FRAME_BYTES = 128 * 1024


def server(settings: Settings, app: FastAPI | None = None) -> uvicorn.Server:
    host, _, port = settings.gateway_addr.rpartition(":")
    config = uvicorn.Config(
        app or create_app(settings), host=host or "127.0.0.1", port=int(port), log_level="warning",
        access_log=False, lifespan="on", ws="websockets-sansio", timeout_graceful_shutdown=int(settings.grace_seconds),
        ws_max_size=WS_MAX_FRAME_BYTES,
    )  # fmt: skip
    return uvicorn.Server(config)


def serve(settings: Settings) -> None:
    """gRPC channels and Redis bind to the loop they are created on: build the app inside it."""

    async def main() -> None:
        await server(settings).serve()

    event_loop.run(main(), settings.event_loop)


def _own_tracing() -> dict[str, Any]:
    """FastAPI 0.16x traces every request itself, as a second root span beside the one
    gateway/instrument.py opens (which continues the caller's trace and parents the gRPC
    calls): one server span per request, so its own tracing is turned off where it exists."""
    if "telemetry" in inspect.signature(FastAPI.__init__).parameters:
        return {"telemetry": {"tracing": False}}
    return {}
