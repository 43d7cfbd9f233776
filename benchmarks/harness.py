"""Shared load-generation pieces for the benchmark scripts: a closed loop, figures, servers."""

from __future__ import annotations

import asyncio
import socket
import statistics
import time
from collections.abc import Awaitable, Callable

# A no-op grpc.aio server: the ceiling any unary RPC can reach on this machine.
ECHO_SERVER = """
import asyncio, grpc, sys
async def main():
    server = grpc.aio.server()
    handler = grpc.method_handlers_generic_handler(
        "bench.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(_echo)})
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(sys.argv[1])
    await server.start()
    await server.wait_for_termination()
async def _echo(req, ctx):
    return req
asyncio.run(main())
"""


def wait_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise SystemExit(f"port {port} never opened")


async def closed_loop(n: int, concurrency: int, call: Callable[[int], Awaitable[object]]) -> tuple[float, list[float]]:
    """Runs n calls with `concurrency` in flight; returns elapsed seconds and per-call latencies."""
    latencies: list[float] = []
    counter = iter(range(n))

    async def worker() -> None:
        for i in counter:
            t0 = time.perf_counter()
            await call(i)
            latencies.append(time.perf_counter() - t0)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - start, latencies


def describe(name: str, n: int, elapsed: float, latencies: list[float]) -> float:
    lat = sorted(latencies)
    rate = n / elapsed
    p50 = statistics.median(lat) * 1000
    p99 = lat[int(len(lat) * 0.99) - 1] * 1000
    print(f"{name:34s} {rate:9.0f}/s   p50 {p50:6.2f} ms   p99 {p99:6.2f} ms   ({n} calls)")
    return rate
