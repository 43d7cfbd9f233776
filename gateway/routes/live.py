"""Websockets: a member's live balance/tier/achievement updates, and ops alerts.

Browsers cannot set headers on a websocket, so the credential may also come as `?token=`.
A member token only ever subscribes to its own member; ops alerts need an `ops:read` key.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse

from gateway.auth import Principal, credential_of, resolve
from gateway.deps import Gateway, call
from gateway.live import Subscription
from gateway.problems import MEDIA_TYPE, Problem, bad_request
from gateway.schemas import MAX_ID_LENGTH
from gateway.strict_json import StrictJsonRoute
from pointmesh.v1 import ledger_pb2

router = APIRouter(tags=["live"], route_class=StrictJsonRoute)
LEDGER = "ledger_svc"
POLICY_VIOLATION, TRY_AGAIN_LATER = 1008, 1013
_DENIAL = "websocket.http.response"  # the ASGI extension for answering a handshake with any HTTP response
# How often a quiet socket re-checks its credential.
RECHECK_SECONDS = 30.0
# How long a close frame may wait to be written, and then for the connection to end, before
# the socket is aborted (the client has not read what was ahead of the frame).
CLOSE_SECONDS = 5.0


def _credential(ws: WebSocket) -> str:
    return credential_of(ws.headers) or ws.query_params.get("token", "")


async def _authenticate(ws: WebSocket) -> Principal | None:
    gw: Gateway = ws.app.state.gateway
    try:
        return await resolve(_credential(ws), gw.keys, gw.tokens)
    except Problem as problem:
        await _refuse(ws, problem, denied=problem.status == 503)
        return None


async def _refuse(ws: WebSocket, problem: Problem, *, denied: bool = True) -> None:
    """Answers the handshake with the problem as REST would (a 503 with its Retry-After, a
    404), where the server can; else closes with the code closest to it."""
    if denied and _DENIAL in ws.scope.get("extensions", {}):
        await ws.send_denial_response(JSONResponse(problem.body(ws.url.path), problem.status, problem.headers,
                                                   MEDIA_TYPE))  # fmt: skip
    else:
        await ws.close(code=_close_code(problem), reason=problem.detail[:120])


def _close_code(problem: Problem) -> int:
    """A credential that could not be checked (the key store unavailable) is not a refused one."""
    return TRY_AGAIN_LATER if problem.status == 503 else POLICY_VIOLATION


def _still_valid(ws: WebSocket, scope: str = "") -> Callable[[], Awaitable[None]]:
    """Raises the Problem when the socket's credential no longer opens it: a member token
    expired, an API key revoked (through the key store's short cache, so a revocation reaches
    an open socket as fast as it reaches REST) or without `scope`, or the key store
    unavailable (503: nothing is sent on a credential that could not be checked)."""
    gw: Gateway = ws.app.state.gateway
    credential = _credential(ws)

    async def check() -> None:
        principal = await resolve(credential, gw.keys, gw.tokens)
        if scope:
            principal.require(scope)

    return check


# `{"type": "ping"}` is 16 bytes; a frame far bigger is something else and is not parsed at all
# (json.loads recurses once per nesting level: "[" * 100_000 raised RecursionError, which ended
# the socket with no close frame).
MAX_PING_BYTES = 256


def _is_ping(message: Mapping[str, Any]) -> bool:
    data = message.get("text") or message.get("bytes") or b""
    if len(data) > MAX_PING_BYTES:
        return False
    try:
        frame = json.loads(data)
    except (ValueError, RecursionError):
        return False
    return isinstance(frame, dict) and frame.get("type") == "ping"


async def _until_closed(ws: WebSocket, sub: Subscription) -> None:
    """Reads what the client sends until it closes: an app-level `{"type": "ping"}` is answered
    with a pong through the subscription's queue (one writer on the socket), anything else is
    ignored. Only a close ends the stream."""
    while True:
        message = await ws.receive()
        if message["type"] == "websocket.disconnect":
            return
        if _is_ping(message):
            sub.offer({"type": "pong"})


def _abort(ws: WebSocket) -> None:
    """Drops the connection without a close frame: one cannot pass a buffer the client does not
    read, and a graceful close would wait on that buffer (and keep the socket) for as long as the
    client stays silent. The transport is the ASGI server's (uvicorn's protocol object behind
    `receive`); without one the server closes the socket when the route returns."""
    for channel in (ws._receive, ws._send):
        transport = getattr(getattr(channel, "__self__", None), "transport", None)
        abort = getattr(transport, "abort", None)  # uvloop's transports are no asyncio.WriteTransport
        if callable(abort):
            abort()
            return


async def _close(ws: WebSocket, code: int, reason: str) -> None:
    """Closes with `code`, and aborts when the close frame cannot be written within CLOSE_SECONDS
    (it waits, like any send, for the client to read what is already buffered) or the connection
    is not over CLOSE_SECONDS after it was: a frame written behind data the client never reads
    stays in the buffer, and the server's own close waits for that buffer to drain."""
    try:
        async with asyncio.timeout(CLOSE_SECONDS):
            await ws.close(code=code, reason=reason)
    except TimeoutError:
        _abort(ws)
    else:
        asyncio.get_running_loop().call_later(CLOSE_SECONDS, _abort, ws)


async def _credential_close(ws: WebSocket, problem: Problem) -> None:
    code = _close_code(problem)
    said = "cannot be checked now" if code == TRY_AGAIN_LATER else "expired or was revoked"
    await _close(ws, code, f"the credential {said}; reconnect")


async def _sent(
    ws: WebSocket,
    message: dict[str, Any],
    overflow: asyncio.Future[Any],
    leaving: asyncio.Future[None],
    still_valid: Callable[[], Awaitable[None]],
) -> bool:
    """Sends one message; False when the socket was given up while the send waited. A send
    waits as long as the client's socket buffer is full, so it is raced against what ends the
    stream: the client leaving, its queue overflowing, its credential dying (re-checked every
    RECHECK_SECONDS while it waits). A client that reads nothing would otherwise stay open and
    subscribed for good. The overflow and the credential abort the socket: a close frame would
    wait behind the same full buffer, and an abandoned send has written nothing."""
    sending = asyncio.ensure_future(ws.send_json(message))
    try:
        while True:
            done, _ = await asyncio.wait(
                {sending, overflow, leaving}, timeout=RECHECK_SECONDS, return_when=asyncio.FIRST_COMPLETED
            )
            if sending in done:
                sending.result()  # a disconnect raises here
                return True
            if leaving in done:
                return False
            if overflow in done or not await _valid(still_valid):
                _abort(ws)
                return False
    finally:
        await _cancelled(sending)


async def _valid(still_valid: Callable[[], Awaitable[None]]) -> bool:
    try:
        await still_valid()
    except Problem:
        return False
    return True


async def _cancelled(task: asyncio.Future[Any]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task


async def _pump(
    ws: WebSocket, sub: Subscription, hello: dict[str, Any], still_valid: Callable[[], Awaitable[None]]
) -> None:
    """Sends queued messages until the client closes, falls too far behind, or its credential
    expires or is revoked (checked before each message, so nothing is sent on a dead credential,
    and every RECHECK_SECONDS on a quiet socket, so an idle one does not stay open on it)."""
    await ws.accept()
    await ws.send_json(hello)
    leaving = asyncio.ensure_future(_until_closed(ws, sub))
    overflow = asyncio.ensure_future(sub.overflowed.wait())
    nxt = asyncio.ensure_future(sub.queue.get())
    try:
        while True:
            done, _ = await asyncio.wait(
                {nxt, leaving, overflow}, timeout=RECHECK_SECONDS, return_when=asyncio.FIRST_COMPLETED
            )
            if leaving in done:
                return
            if overflow in done:
                await _close(ws, TRY_AGAIN_LATER, "too far behind; reconnect and read the balance")
                return
            try:
                await still_valid()
            except Problem as problem:
                await _credential_close(ws, problem)
                return
            if nxt in done:
                if not await _sent(ws, nxt.result(), overflow, leaving, still_valid):
                    return
                nxt = asyncio.ensure_future(sub.queue.get())
    except WebSocketDisconnect:
        return
    finally:
        for task in (nxt, leaving, overflow):
            await _cancelled(task)


@router.websocket("/v1/members/{member_id}/live")
async def member_live(ws: WebSocket, member_id: str) -> None:
    # The id's length is checked here, not by the path's bound: FastAPI would refuse a bound
    # broken on a websocket with a bare 403, which reads as "this key may not".
    caller = await _authenticate(ws)
    if caller is None:
        return
    try:
        caller.may_read_member(member_id)
    except Problem as problem:
        await ws.close(code=POLICY_VIOLATION, reason=problem.detail[:120])
        return
    gw: Gateway = ws.app.state.gateway
    if caller.key is not None:  # (a member token names a member that was: its own)
        if len(member_id) > MAX_ID_LENGTH:  # as GET /v1/members/{id} answers it
            await _refuse(ws, bad_request("path.member_id", f"String should have at most {MAX_ID_LENGTH} characters"))
            return
        try:  # the member routes' 400/404, not a stream that stays silent for good
            await call(LEDGER, gw.ledger.GetMember(ledger_pb2.GetMemberRequest(member_id=member_id)))
        except Problem as problem:
            await _refuse(ws, problem)
            return
    with gw.hub.member(member_id) as sub:
        await _pump(ws, sub, {"type": "subscribed", "member_id": member_id}, _still_valid(ws))


@router.websocket("/v1/ops/alerts")
async def ops_alerts(ws: WebSocket) -> None:
    caller = await _authenticate(ws)
    if caller is None:
        return
    try:
        caller.require("ops:read")
    except Problem as problem:
        await ws.close(code=POLICY_VIOLATION, reason=problem.detail[:120])
        return
    gw: Gateway = ws.app.state.gateway
    with gw.hub.alerts() as sub:
        await _pump(ws, sub, {"type": "subscribed", "stream": "ops_alerts"}, _still_valid(ws, "ops:read"))
