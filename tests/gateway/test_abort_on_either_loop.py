"""The live route's abort ends a connection whose client has stopped reading, on asyncio's loop
and on uvloop (what the gateway process runs on), whose transports are not asyncio classes.
The in-process gateway tests run on whichever loop the suite runs on; this runs on both."""

from __future__ import annotations

import asyncio
import contextlib
from types import SimpleNamespace
from typing import Any

import pytest

from gateway.routes.live import _abort
from pointmesh import event_loop
from tests.loops import run_on

UNREAD = 64 * 1024 * 1024  # far past what loopback's socket buffers hold


class _ServerSide(asyncio.Protocol):
    """Stands in for uvicorn's protocol object: `_abort` finds the transport behind `receive`."""

    def __init__(self, accepted: asyncio.Future[_ServerSide]) -> None:
        self.accepted = accepted
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.accepted.set_result(self)

    async def receive(self) -> dict[str, str]:
        return {"type": "websocket.disconnect"}

    async def send(self, message: dict[str, str]) -> None:
        return None


async def _abort_behind_an_unread_buffer() -> tuple[bool, int]:
    loop = asyncio.get_running_loop()
    accepted: asyncio.Future[_ServerSide] = loop.create_future()
    server = await loop.create_server(lambda: _ServerSide(accepted), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        side = await asyncio.wait_for(accepted, 5)
        side.transport.write(b"x" * UNREAD)  # the client reads none of it yet
        _abort(SimpleNamespace(_receive=side.receive, _send=side.send))
        closing = bool(side.transport.is_closing())
        got = 0
        with contextlib.suppress(TimeoutError):  # a connection left open: reads on till then
            async with asyncio.timeout(10):  # a graceful close hands over all of it, then EOF
                while chunk := await _read(reader):
                    got += len(chunk)
        return closing, got
    finally:
        writer.close()
        server.close()


async def _read(reader: asyncio.StreamReader) -> bytes:
    try:
        return await reader.read(1 << 20)
    except ConnectionResetError:
        return b""


@pytest.mark.parametrize("kind", event_loop.LOOPS)
def test_an_aborted_connection_ends_without_handing_over_its_buffer(kind: str) -> None:
    closing, got = run_on(kind, _abort_behind_an_unread_buffer())
    assert closing, "the transport was left open"
    assert got < UNREAD, "the whole buffer went out first: that is a graceful close, not an abort"
