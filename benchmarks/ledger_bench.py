"""Ledger throughput on this machine, printed as figures; never a pass/fail.

Runs ledger_svc (and a no-op echo server) as subprocesses on loopback, so the server and this
load generator each get a core, then measures:
  * unary Earn at concurrency 32: calls/s, p50, p99, and the ratio to a no-op grpc.aio echo
    measured the same way in the same run (the ceiling for any unary RPC here);
  * cached GetBalance at concurrency 32;
  * unary Redeem at concurrency 32 (on Cassandra each one is a lightweight transaction);
  * IngestBatch postings/s, next to a raw-SQLite baseline that writes exactly the rows the
    store writes per posting (transaction, entries, lot, balances, idempotency, outbox) with
    the same pragmas and shard count, one transaction per batch.

`--store cassandra` runs the same calls against ledger_svc on a real single Cassandra node
(started from the Maven jars, or POINTMESH_CASSANDRA_CONTACT_POINTS if set) right after the
SQLite run, and prints the two side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import grpc

from benchmarks.harness import ECHO_SERVER, REPO, CpuMeter, closed_loop, describe, wait_port
from ledger_svc.store.cassandra_schema import migrate
from ledger_svc.store.sqlite import SHARD_SCHEMA
from ledger_svc.store.sqlite_worker import connect
from pointmesh import cassandra_client
from pointmesh.cassandra_server import CassandraServer
from pointmesh.config import load_settings
from pointmesh.redis_server import RedisServer, free_port
from pointmesh.v1 import common_pb2, ledger_pb2, ledger_pb2_grpc

INGEST_PAGE = 500
# Issue 4's targets, for the CPU budget a call has at that rate on this machine.
EARN_TARGET, BALANCE_TARGET = 2_000, 5_000


def key(k: str) -> common_pb2.IdempotencyKey:
    return common_pb2.IdempotencyKey(namespace="bench", key=k)


async def bench_grpc(
    address: str, echo_address: str, pids: tuple[int, int], calls: int, ingest_items: int
) -> dict[str, float]:
    """`pids`: the ledger's and the echo server's, for the CPU a call costs each side."""
    figures: dict[str, float] = {}
    ledger_cpu, echo_cpu = CpuMeter(pids[0]), CpuMeter(pids[1])
    echo_channel = grpc.aio.insecure_channel(echo_address)
    echo = echo_channel.unary_unary("/bench.Echo/Echo")
    await echo(b"warm")
    echo_cpu.start()
    elapsed, lat = await closed_loop(calls, 32, lambda i: echo(b"x" * 64))
    figures["echo"] = describe("no-op grpc.aio echo, c=32", calls, elapsed, lat)
    echo_cpu.report(calls, BALANCE_TARGET)

    channel = grpc.aio.insecure_channel(address)
    stub = ledger_pb2_grpc.LedgerServiceStub(channel)
    members = []
    for i in range(200):
        r = await stub.CreateMember(ledger_pb2.CreateMemberRequest(idempotency_key=key(f"m{i}")))
        members.append(r.member.member_id)
    run = uuid.uuid4().hex[:8]

    async def earn(i: int) -> object:
        return await stub.Earn(
            ledger_pb2.EarnRequest(
                idempotency_key=key(f"{run}-e{i}"), member_id=members[i % len(members)], points=10, reference=f"r{i}"
            )
        )

    await closed_loop(500, 32, lambda i: earn(calls + i))  # warm-up
    ledger_cpu.start()
    elapsed, lat = await closed_loop(calls, 32, earn)
    figures["earn"] = describe("unary Earn, c=32", calls, elapsed, lat)
    ledger_cpu.report(calls, EARN_TARGET)
    figures["earn_p99_ms"] = sorted(lat)[int(len(lat) * 0.99) - 1] * 1000
    print(f"{'  Earn / echo ceiling':34s} {figures['earn'] / figures['echo']:9.2f}")

    async def balance(i: int) -> object:
        return await stub.GetBalance(ledger_pb2.GetBalanceRequest(member_id=members[i % 100]))

    await closed_loop(400, 32, balance)  # fills the cache
    ledger_cpu.start()
    elapsed, lat = await closed_loop(calls, 32, balance)
    figures["balance"] = describe("cached GetBalance, c=32", calls, elapsed, lat)
    ledger_cpu.report(calls, BALANCE_TARGET)

    async def redeem(i: int) -> object:
        return await stub.Redeem(
            ledger_pb2.RedeemRequest(idempotency_key=key(f"{run}-r{i}"), member_id=members[i % len(members)], points=1)
        )

    elapsed, lat = await closed_loop(calls, 32, redeem)
    figures["redeem"] = describe("unary Redeem, c=32", calls, elapsed, lat)
    figures["redeem_p99_ms"] = sorted(lat)[int(len(lat) * 0.99) - 1] * 1000

    def posting(i: int) -> ledger_pb2.IngestBatchRequest:
        return ledger_pb2.IngestBatchRequest(
            earn=ledger_pb2.EarnRequest(
                idempotency_key=key(f"{run}-b{i}"), member_id=members[i % len(members)], points=5
            )
        )

    async def items(first: int) -> object:
        for i in range(first, first + ingest_items):
            yield posting(i)

    async def pages(first: int) -> object:
        for start in range(first, first + ingest_items, INGEST_PAGE):
            page = [posting(i) for i in range(start, min(start + INGEST_PAGE, first + ingest_items))]
            yield ledger_pb2.IngestBatchRequest(page=ledger_pb2.IngestPage(items=page))

    for name, stream in (("ingest", items(0)), ("ingest_paged", pages(ingest_items))):
        start = time.perf_counter()
        summary = await stub.IngestBatch(stream, timeout=600)
        elapsed = time.perf_counter() - start
        figures[name] = summary.posted / elapsed
        label = "IngestBatch, one item per message" if name == "ingest" else f"IngestBatch, pages of {INGEST_PAGE}"
        print(f"{label:34s} {figures[name]:9.0f} postings/s   ({summary.posted} posted, {summary.failed} failed)")
    await channel.close()
    await echo_channel.close()
    return figures


_RAW_STATEMENTS = (
    "INSERT INTO transactions VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
    "INSERT INTO entries (tx_id, account, points, kind, recorded_at, business_time, reference) VALUES (?,?,?,?,?,?,?)",
    "INSERT INTO lots VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
    "INSERT INTO accounts VALUES (?,?,0,0,1) ON CONFLICT(account) DO UPDATE SET"
    " balance=balance+excluded.balance, version=version+1",
    "INSERT INTO idempotency VALUES (?,?,?,?,?,?)",
    "INSERT INTO outbox (event_id, member_id, payload, created_at) VALUES (?,?,?,?)",
)


def _raw_rows(i: int) -> list[list[tuple[object, ...]]]:
    """The rows of posting i, per statement of _RAW_STATEMENTS."""
    tx, member_id = f"tx_{i:028x}", f"m{i % 200}"
    member, now = f"member:{member_id}:points", 1_700_000_000_000_000 + i
    return [
        [(tx, "EARN", member_id, "points", 5, now, now, "", "program", 0, "", 0, 0, f"lot{i}", 0, "", "{}")],
        [(tx, "funding:program:points", -5, "EARN", now, now, ""), (tx, member, 5, "EARN", now, now, "")],
        [(f"lot{i}", member_id, "points", tx, 5, 5, now + 10**13, now, 0, None, 0, 0)],
        [(member, 5), ("funding:program:points", -5)],
        [("bench", tx, "Earn", "f" * 64, "{}", now)],
        [(f"ev{i}", member_id, "{}", now)],
    ]


def raw_sqlite_baseline(items: int, shards: int, synchronous: str, batch: int = 500, *, bulk: bool = False) -> float:
    """Writes the rows one Earn writes, per shard, one transaction per batch, no Python ledger
    logic: row by row, or (`bulk`) one executemany per statement per batch."""
    with tempfile.TemporaryDirectory() as tmp:
        conns = []
        for s in range(shards):
            conn = connect(Path(tmp) / f"s{s}.sqlite", synchronous)
            conn.executescript(SHARD_SCHEMA)
            conns.append(conn)
        start = time.perf_counter()
        for first in range(0, items, batch):
            per_shard: dict[int, list[int]] = {}
            for i in range(first, min(first + batch, items)):
                per_shard.setdefault(i % shards, []).append(i)
            for s, ids in per_shard.items():
                c = conns[s]
                c.execute("BEGIN IMMEDIATE")
                if bulk:
                    grouped: list[list[tuple[object, ...]]] = [[] for _ in _RAW_STATEMENTS]
                    for i in ids:
                        for rows, more in zip(grouped, _raw_rows(i), strict=True):
                            rows.extend(more)
                    for sql, rows in zip(_RAW_STATEMENTS, grouped, strict=True):
                        c.executemany(sql, rows)
                else:
                    for i in ids:
                        for sql, rows in zip(_RAW_STATEMENTS, _raw_rows(i), strict=True):
                            for row in rows:
                                c.execute(sql, row)
                c.execute("COMMIT")
        elapsed = time.perf_counter() - start
        for conn in conns:
            conn.close()
    rate = items / elapsed
    label = "raw SQLite, executemany per batch" if bulk else "raw SQLite baseline (same rows)"
    print(f"{label:34s} {rate:9.0f} postings/s   ({items} postings)")
    return rate


def run_ledger(store_env: dict[str, str], shards: int, calls: int, ingest: int) -> dict[str, float]:
    """ledger_svc as a subprocess on `store_env`, measured by bench_grpc."""
    with tempfile.TemporaryDirectory() as tmp:
        redis = RedisServer(free_port(), Path(tmp) / "redis", appendonly=False)
        redis.start()
        port, echo_port = free_port(), free_port()
        env = {
            **os.environ,
            "POINTMESH_DATA_DIR": str(Path(tmp) / "data"),
            "POINTMESH_REDIS_URL": redis.url,
            "POINTMESH_LEDGER_ADDR": f"127.0.0.1:{port}",
            "POINTMESH_LEDGER_METRICS_PORT": "0",
            "POINTMESH_LEDGER_SHARDS": str(shards),
            "POINTMESH_LOG_LEVEL": "WARNING",
            "POINTMESH_INGEST_CONSUMER": "false",
            "POINTMESH_FRAUD_SCREENING": "false",
            **store_env,
        }
        ledger = subprocess.Popen([sys.executable, "-m", "pointmesh.cli", "ledger", "serve"], env=env, cwd=REPO)
        echo = subprocess.Popen([sys.executable, "-c", ECHO_SERVER, f"127.0.0.1:{echo_port}"])
        try:
            wait_port(port, timeout=60)
            wait_port(echo_port)
            addresses = f"127.0.0.1:{port}", f"127.0.0.1:{echo_port}"
            return asyncio.run(bench_grpc(*addresses, (ledger.pid, echo.pid), calls, ingest))
        finally:
            for proc in (ledger, echo):
                proc.terminate()
                proc.wait(timeout=30)
            redis.stop()


def cassandra_env(tmp: Path) -> tuple[dict[str, str], CassandraServer | None]:
    """A migrated keyspace on the given node or on one started here; a fresh ledger name."""
    given = os.environ.get("POINTMESH_CASSANDRA_CONTACT_POINTS", "")
    node = None
    if not given:
        node = CassandraServer(tmp / "cassandra", free_port(), free_port(), free_port())
        print(f"cassandra node ready in {node.start():.1f}s")
        given = node.contact_point
    settings = load_settings({}, cassandra_contact_points=given, cassandra_keyspace="pointmesh_bench")
    cluster, session = cassandra_client.connect(settings)
    try:
        migrate(session, settings.cassandra_keyspace, "simple:1")
    finally:
        cluster.shutdown()
    env = {"POINTMESH_STORE": "cassandra", "POINTMESH_CASSANDRA_CONTACT_POINTS": given,
           "POINTMESH_CASSANDRA_KEYSPACE": "pointmesh_bench", "POINTMESH_CASSANDRA_LEDGER": "b" + uuid.uuid4().hex[:12]}  # fmt: skip
    return env, node


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=6000)
    parser.add_argument("--ingest", type=int, default=60000)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--store", choices=["sqlite", "cassandra"], default="sqlite",
                        help="cassandra: also run on a real Cassandra node and compare")  # fmt: skip
    parser.add_argument("--cassandra-calls", type=int, default=1500)
    parser.add_argument("--cassandra-ingest", type=int, default=3000)
    args = parser.parse_args()
    synchronous = os.environ.get("POINTMESH_SQLITE_SYNCHRONOUS", "NORMAL")
    print(f"ledger benchmark: {os.cpu_count()} cores, {args.shards} SQLite shards, synchronous={synchronous}, WAL")
    figures = run_ledger({"POINTMESH_STORE": "sqlite"}, args.shards, args.calls, args.ingest)
    baseline = raw_sqlite_baseline(args.ingest, args.shards, synchronous)
    bulk = raw_sqlite_baseline(args.ingest, args.shards, synchronous, bulk=True)
    for name, label in (("ingest", "single items"), ("ingest_paged", "pages")):
        print(f"{'  IngestBatch ' + label + ' / raw':34s} {figures[name] / baseline:9.2f}"
              f"   ({figures[name] / bulk:.2f} of the executemany baseline)")  # fmt: skip
    if args.store == "cassandra":
        with tempfile.TemporaryDirectory() as tmp:
            env, node = cassandra_env(Path(tmp))
            try:
                print("\nsame calls, ledger_svc on Cassandra (one node, LOCAL_QUORUM, LWT per member partition):")
                on_cassandra = run_ledger(env, args.shards, args.cassandra_calls, args.cassandra_ingest)
            finally:
                if node is not None:
                    node.stop()
        print(f"\n{'':24s} {'SQLite':>12s} {'Cassandra':>12s} {'ratio':>7s}")
        for name, label in (("earn", "Earn calls/s"), ("earn_p99_ms", "Earn p99 ms"), ("redeem", "Redeem calls/s"),
                            ("redeem_p99_ms", "Redeem p99 ms"), ("ingest", "IngestBatch postings/s")):  # fmt: skip
            a, b = figures[name], on_cassandra[name]
            print(f"{label:24s} {a:12.1f} {b:12.1f} {b / a:7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
