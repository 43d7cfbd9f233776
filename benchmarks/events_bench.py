"""Event-bus figures on this machine, Redis Streams and Kafka in the same run; never pass/fail.

* publish throughput: batches of 500 events, returning only when the bus acknowledged them
  (the outbox relay's path);
* outbox relay: a backlog of earned-points events in ledger_svc's outbox drained to the bus
  (read rows, publish, mark relayed), events/s;
* purchase -> consumer: a ledger event published and received by a consumer group in this
  process, p50/p99 (one event at a time, every 20 ms);
* bulk ingest: purchases produced to the ingest topic and earned by ledger_svc (a subprocess
  with its ingest consumer, calling rules_svc, also a subprocess), purchases/s (Kafka only).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

from redis.asyncio import Redis

from benchmarks.harness import rules_and_ledger
from ledger_svc import commands as c
from ledger_svc.app import build as build_ledger
from ledger_svc.domain import IdemKey
from pointmesh.clients import ledger_stub
from pointmesh.config import load_settings
from pointmesh.events import INGEST_PURCHASES, EventBus, OutgoingEvent, RedisStreamBus
from pointmesh.kafka_bus import KafkaBus
from pointmesh.kafka_server import KafkaServer
from pointmesh.redis_server import RedisServer, free_port
from pointmesh.timestamps import to_timestamp
from pointmesh.v1 import common_pb2, ledger_pb2


async def publish_rate(bus: EventBus, name: str, n: int) -> None:
    topic = f"bench.{uuid.uuid4().hex[:8]}"
    await bus.ensure_topics([topic])
    payload = b"x" * 300
    events = [OutgoingEvent(f"m_{i % 1000}", f"e{i}", "points_earned", payload) for i in range(n)]
    t0 = time.perf_counter()
    for start in range(0, n, 500):
        await bus.publish(topic, events[start : start + 500])
    print(f"{name + ' publish, 500/batch':40s} {n / (time.perf_counter() - t0):9.0f} events/s")


async def end_to_end(bus: EventBus, name: str, n: int) -> None:
    topic = f"bench.{uuid.uuid4().hex[:8]}"
    await bus.ensure_topics([topic])
    member = bus.group(topic, "bench", "c1")
    await member.poll(block_ms=100)  # join the group before the first event
    sent: dict[str, float] = {}
    lat: list[float] = []

    async def consume() -> None:
        while len(lat) < n:
            batch = await member.poll(block_ms=100)
            now = time.perf_counter()
            lat.extend(now - sent[m.event_id] for m in batch if m.event_id in sent)
            await member.commit(batch)

    consumer = asyncio.create_task(consume())
    for i in range(n):
        sent[f"e{i}"] = time.perf_counter()
        await bus.publish(topic, [OutgoingEvent("m_1", f"e{i}", "points_earned", b"x" * 300)])
        await asyncio.sleep(0.02)
    await asyncio.wait_for(consumer, 60)
    await member.close()
    lat.sort()
    print(f"{name + ' publish -> consumer':40s} p50 {statistics.median(lat) * 1000:6.2f} ms   "
          f"p99 {lat[int(len(lat) * 0.99) - 1] * 1000:6.2f} ms   ({n} events)")  # fmt: skip


async def relay_rate(tmp: Path, redis_url: str, bus_settings: dict[str, str], name: str, n: int) -> None:
    settings = load_settings({}, data_dir=tmp / f"relay-{name}", redis_url=redis_url, ledger_addr="127.0.0.1:0",
                             ledger_metrics_port=0, fraud_screening=False, ingest_consumer=False,
                             **bus_settings)  # fmt: skip
    app = await build_ledger(settings)
    await app.bus.ensure_topics(["pointmesh.ledger.events", "pointmesh.ops.alerts"])
    service = app.service
    members = [(await service.create_member(c.CreateMember(IdemKey("b", f"m{i}")))).member_id for i in range(100)]
    await service.ingest([c.Earn(IdemKey("b", f"e{i}"), members[i % 100], "points", 5) for i in range(n)])
    t0 = time.perf_counter()
    sent = 0
    while drained := await app.relay.relay_once():
        sent += drained
    print(f"{name + ' outbox relay (read, publish, mark)':40s} {sent / (time.perf_counter() - t0):9.0f} events/s")
    await app.store.close()
    await app.bus.close()
    await app.redis.aclose()


def bulk_ingest(tmp: Path, redis_url: str, bootstrap: str, n: int) -> None:
    env = {
        "POINTMESH_EVENT_BUS": "kafka",
        "POINTMESH_KAFKA_BOOTSTRAP": bootstrap,
        "POINTMESH_DATA_DIR": str(tmp / "ingest"),
    }
    with rules_and_ledger(tmp, redis_url, **env) as ledger_addr:
        asyncio.run(_ingest(ledger_addr, bootstrap, n))


async def _ingest(ledger_addr: str, bootstrap: str, n: int) -> None:
    stub = ledger_stub(ledger_addr, default_timeout_seconds=30)
    members = [(await stub.CreateMember(ledger_pb2.CreateMemberRequest(
        idempotency_key=common_pb2.IdempotencyKey(namespace="b", key=f"m{i}")))).member.member_id
        for i in range(200)]  # fmt: skip
    when = to_timestamp(datetime.now(UTC) - timedelta(hours=1))
    events = []
    for i in range(n):
        amount = common_pb2.Money(amount_minor=1000 + i % 5000, currency="EUR")
        request = ledger_pb2.RecordPurchaseRequest(
            member_id=members[i % 200], channel="franchise", store_id="F-001", receipt_id=f"b{i}", total=amount,
            lines=[ledger_pb2.PurchaseLine(sku="s", category="c", quantity=1, amount=amount)], receipt_time=when,
        )  # fmt: skip
        events.append(OutgoingEvent(request.member_id, f"b{i}", "record_purchase", request.SerializeToString()))
    want = sum((1000 + i % 5000) // 100 for i in range(n))
    bus = KafkaBus(bootstrap)
    t0 = time.perf_counter()
    for start in range(0, n, 1000):
        await bus.publish(INGEST_PURCHASES, events[start : start + 1000])
    await bus.close()
    produced = time.perf_counter() - t0
    while True:
        got = await asyncio.gather(*(stub.GetBalance(ledger_pb2.GetBalanceRequest(member_id=m)) for m in members))
        if sum(b.balance.balance_points for b in got) >= want:
            break
        await asyncio.sleep(0.2)
    total = time.perf_counter() - t0
    print(f"{'Kafka bulk ingest (produce -> earned)':40s} {n / total:9.0f} purchases/s   "
          f"({n} purchases, produced in {produced:.1f}s, all earned in {total:.1f}s)")  # fmt: skip


def main() -> int:
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--latency-events", type=int, default=300)
    parser.add_argument("--purchases", type=int, default=20_000)
    args = parser.parse_args()
    print(f"event-bus benchmark: {os.cpu_count()} cores; Redis Streams and a single-node Kafka (KRaft) on loopback")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        redis = RedisServer(free_port(), tmp / "redis", appendonly=True)
        redis.start()
        kafka = KafkaServer(tmp / "kafka", free_port(), free_port())
        print(f"{'Kafka broker start to ready':40s} {kafka.start():9.1f} s")
        try:
            buses: dict[str, dict[str, str]] = {
                "redis": {"event_bus": "redis"},
                "kafka": {"event_bus": "kafka", "kafka_bootstrap": kafka.bootstrap},
            }

            async def run() -> None:
                for name, bus in (("redis", RedisStreamBus(Redis.from_url(redis.url), owns_client=True)),
                                  ("kafka", KafkaBus(kafka.bootstrap))):  # fmt: skip
                    await publish_rate(bus, name, args.events)
                    await end_to_end(bus, name, args.latency_events)
                    await bus.close()
                    await relay_rate(tmp, redis.url, buses[name], name, args.events // 2)

            asyncio.run(run())
            bulk_ingest(tmp, redis.url, kafka.bootstrap, args.purchases)
        finally:
            kafka.stop()
            redis.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
