"""Shared load-generation pieces for the benchmark scripts: a closed loop, figures, servers."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

from pointmesh.redis_server import free_port

REPO = Path(__file__).resolve().parent.parent
# A one-currency program: 1 point per EUR.
BENCH_PROGRAM = """
program: bench
default_timezone: Europe/Helsinki
units: [points]
channels: [pos, franchise]
stores: [{id: F-001, region: FI, timezone: Europe/Helsinki}]
base_rates: [{currency: EUR, unit: points, points: 1, per_minor: 100}]
"""

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


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU of a whole process (every thread), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CPU seconds the load generator (this process) and a server process spend between start
    and stop, per call: what a call costs the machine, which caps calls/s at cores / cost."""

    def __init__(self, server_pid: int) -> None:
        self.server_pid = server_pid
        self._client = self._server = 0.0

    def start(self) -> None:
        self._client, self._server = time.process_time(), process_cpu_seconds(self.server_pid)

    def report(self, calls: int, target_per_s: float | None = None) -> tuple[float, float]:
        """Prints and returns (client, server) CPU microseconds a call since start."""
        client = (time.process_time() - self._client) / calls * 1e6
        server = (process_cpu_seconds(self.server_pid) - self._server) / calls * 1e6
        line = f"{'  CPU a call':34s} client {client:5.0f} us + server {server:5.0f} us = {client + server:5.0f} us"
        if target_per_s:
            budget = (os.cpu_count() or 1) / target_per_s * 1e6
            line += f"   ({os.cpu_count()} cores allow {budget:.0f} us a call at {target_per_s:,.0f}/s)"
        print(line)
        return client, server


@contextlib.contextmanager
def rules_and_ledger(tmp: Path, redis_url: str, **env: str) -> Iterator[str]:
    """rules_svc on BENCH_PROGRAM and ledger_svc (fraud screening off) as subprocesses on
    free ports; yields the ledger's address. `env` adds or overrides POINTMESH_* variables."""
    rules_port, ledger_port = free_port(), free_port()
    (tmp / "bench.yaml").write_text(BENCH_PROGRAM)
    full = {**os.environ, "POINTMESH_DATA_DIR": str(tmp / "data"), "POINTMESH_REDIS_URL": redis_url,
            "POINTMESH_RULES_ADDR": f"127.0.0.1:{rules_port}", "POINTMESH_RULES_METRICS_PORT": "0",
            "POINTMESH_RULES_SEED_FILE": str(tmp / "bench.yaml"), "POINTMESH_PROGRAM": "bench",
            "POINTMESH_LEDGER_ADDR": f"127.0.0.1:{ledger_port}", "POINTMESH_LEDGER_METRICS_PORT": "0",
            "POINTMESH_FRAUD_SCREENING": "false", "POINTMESH_LOG_LEVEL": "WARNING", **env}  # fmt: skip
    procs = [subprocess.Popen([sys.executable, "-m", "pointmesh.cli", svc, "serve"], env=full, cwd=REPO)
             for svc in ("rules", "ledger")]  # fmt: skip
    try:
        wait_port(int(full["POINTMESH_RULES_ADDR"].rpartition(":")[2]), 60)  # `env` may name the ports
        wait_port(int(full["POINTMESH_LEDGER_ADDR"].rpartition(":")[2]), 60)
        yield full["POINTMESH_LEDGER_ADDR"]
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(30)


class LeanHttp:
    """A minimal HTTP/1.1 keep-alive client over asyncio streams, for open-loop load.

    httpx spends about a millisecond of client CPU per request; at a few hundred requests a
    second on two cores the load generator then saturates before the services do (it did:
    the gateway benchmark's "collapse" above 200/s was httpx at 90-95% of a core while the
    services idled). This client writes a request and reads status, headers and a
    Content-Length body; it refuses chunked bodies, and has no redirects and no TLS. The
    most recently used connection goes first (a server closes idle ones), and a request
    whose reused connection was closed before any answer is sent once more on a new one.
    """

    def __init__(
        self, host: str, port: int, headers: dict[str, str], connections: int = 256, timeout: float = 30.0
    ) -> None:
        self._host, self._port, self._timeout = host, port, timeout
        self._head = "".join(f"{k}: {v}\r\n" for k, v in {"Host": f"{host}:{port}", **headers}.items())
        self._idle: asyncio.LifoQueue[tuple[asyncio.StreamReader, asyncio.StreamWriter] | None] = asyncio.LifoQueue()
        for _ in range(connections):
            self._idle.put_nowait(None)  # opened on first use

    async def post(self, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
        extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        request = (
            f"POST {path} HTTP/1.1\r\n{self._head}{extra}Content-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        conn = await self._idle.get()
        keep = False
        try:
            async with asyncio.timeout(self._timeout):
                if conn is not None:
                    try:
                        status, payload, keep = await self._exchange(conn, request)
                        return status, payload
                    except (asyncio.IncompleteReadError, ConnectionError) as exc:
                        if isinstance(exc, asyncio.IncompleteReadError) and exc.partial:
                            raise
                        conn[1].close()  # closed by the server while idle: once more, on a new one
                conn = await asyncio.open_connection(self._host, self._port)
                status, payload, keep = await self._exchange(conn, request)
                return status, payload
        finally:
            if not keep and conn is not None:
                conn[1].close()
            self._idle.put_nowait(conn if keep else None)

    @staticmethod
    async def _exchange(
        conn: tuple[asyncio.StreamReader, asyncio.StreamWriter], request: bytes
    ) -> tuple[int, bytes, bool]:
        reader, writer = conn
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length, keep = 0, True
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            name, value = name.strip().lower(), value.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding":
                raise ValueError(f"transfer-encoding {value.decode()} is not supported")
            elif name == b"connection" and value == b"close":
                keep = False
        return status, await reader.readexactly(length), keep

    async def close(self) -> None:
        while not self._idle.empty():
            conn = self._idle.get_nowait()
            if conn is not None:
                conn[1].close()
