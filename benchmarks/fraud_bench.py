"""fraud_svc latency and throughput on this machine, printed as figures; never a pass/fail.

* Score, one row at a time, in-process: feature computation with the Redis velocity read and
  update (one Lua call on a real redis-server), the model, the decision; next to the model
  alone (LightGBM predict on one prepared row);
* Score over gRPC on loopback to fraud_svc running as a subprocess (sequential, and c=8);
* ScoreBatch rows/s over gRPC and in-process (velocity in Lua calls of 25 events pipelined on
  one connection, the model scoring a chunk while Redis computes the next), and the Redis CPU a
  row costs (INFO cpu around the gRPC run);
* what a ScoreBatch row costs at the least, each part measured alone: the caller building and
  serialising the request, fraud_svc parsing it into domain contexts, the model scoring a batch,
  and Redis running the smallest velocity one could keep (one per-minute counter for each of the
  five entities, bumped and read in one Lua call per 200 rows); their sum against the CPU a row
  may cost at the 100,000 rows/s target on this machine's cores;
* training time for --train-rows generated rows (generation and fit shown apart).
Rows come from the synthetic generator in event-time order, so the velocity windows fill up.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
from redis.asyncio import Redis

from benchmarks.harness import REPO, closed_loop, describe, wait_port
from fraud_svc.domain import TxContext
from fraud_svc.features import epoch_ms, featurize
from fraud_svc.model import latest_artifact, load_artifact
from fraud_svc.server import context, context_pb
from fraud_svc.service import FraudService, ModelSlot
from fraud_svc.synth import SynthConfig, generate
from fraud_svc.training import train_churn, train_fraud
from fraud_svc.velocity_redis import RedisVelocity
from pointmesh.redis_server import RedisServer, free_port
from pointmesh.rpc import client_channel
from pointmesh.v1 import fraud_pb2, fraud_pb2_grpc


def percentiles(name: str, seconds: Sequence[float]) -> None:
    lat = sorted(seconds)
    p50, p99 = statistics.median(lat) * 1000, lat[int(len(lat) * 0.99) - 1] * 1000
    print(f"{name:40s} p50 {p50:6.3f} ms   p99 {p99:6.3f} ms   ({len(lat)} rows)")


def events(rows: int, seed: int, tag: str) -> list[TxContext]:
    from dataclasses import replace

    found = list(generate(SynthConfig.for_rows(max(rows * 2, 10_000), seed=seed)).contexts())[:rows]
    # fraud_svc scores events up to 35 days old (fraud_svc/domain.py MAX_LATENESS): the generated
    # months are pressed, in order, into the last 30 days (denser velocity than generated; the
    # figures are latency and throughput, not decisions).
    first, last = found[0].occurred_at, max(c.occurred_at for c in found)
    span, end = max(last - first, timedelta(seconds=1)), datetime.now(UTC) - timedelta(minutes=1)

    def pressed(at: datetime) -> datetime:
        return end - timedelta(days=30) * ((last - at) / span)

    def kept(at: datetime | None, by: datetime) -> datetime | None:
        return min(at, by) if at is not None else None

    out = []
    for c in found:
        at = pressed(c.occurred_at)
        out.append(replace(c, event_id=f"{tag}{c.event_id}", member_id=f"{tag}{c.member_id}", occurred_at=at,
                           contact_changed_at=kept(c.contact_changed_at, at), member_since=kept(c.member_since, at)))  # fmt: skip
    return out


async def in_process(models: Path, redis_url: str, rows: int) -> None:
    redis = Redis.from_url(redis_url)
    service = FraudService(RedisVelocity(redis, prefix="bench:a:"), ModelSlot("fraud", models),
                           ModelSlot("churn", models))  # fmt: skip
    service.load_at_start()
    model = service.fraud.model
    assert model is not None
    sample = events(rows, 41, "ip-")
    for ctx in sample[:200]:  # warm-up
        await service.score(ctx)
    lat = []
    for ctx in sample[200:]:
        t0 = time.perf_counter()
        await service.score(ctx)
        lat.append(time.perf_counter() - t0)
    percentiles("Score in-process (features+Redis+model)", lat)
    prepared = [await featurize(ctx, RedisVelocity(redis, prefix="bench:b:")) for ctx in sample[:2000]]
    lat = []
    for row in prepared:
        matrix = np.asarray([row.values], dtype=np.float64)
        t0 = time.perf_counter()
        model.predict(matrix)
        lat.append(time.perf_counter() - t0)
    percentiles("  model only (one-row predict)", lat)
    batch = events(rows, 43, "ib-")
    service.velocity = RedisVelocity(redis, prefix="bench:c:")
    t0 = time.perf_counter()
    for start in range(0, len(batch), 1000):
        await service.score_batch(batch[start : start + 1000])
    elapsed = time.perf_counter() - t0
    print(f"{'score_batch in-process, 1000/batch':40s} {len(batch) / elapsed:9.0f} rows/s")
    await redis.aclose()


async def redis_cpu_seconds(redis: Redis) -> float:
    info = await redis.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


async def over_grpc(address: str, redis_url: str, rows: int) -> None:
    channel = client_channel(address, default_timeout_seconds=30)
    stub = fraud_pb2_grpc.FraudServiceStub(channel)
    single = [context_pb(c) for c in events(rows, 51, "g-")]
    for t in single[:200]:
        await stub.Score(fraud_pb2.ScoreRequest(transaction=t))
    lat = []
    for t in single[200:]:
        t0 = time.perf_counter()
        await stub.Score(fraud_pb2.ScoreRequest(transaction=t))
        lat.append(time.perf_counter() - t0)
    percentiles("Score over gRPC, sequential", lat)
    more = [context_pb(c) for c in events(rows, 52, "c-")]
    elapsed, lat = await closed_loop(len(more), 8, lambda i: stub.Score(fraud_pb2.ScoreRequest(transaction=more[i])))
    describe("Score over gRPC, c=8", len(more), elapsed, lat)
    bulk = [context_pb(c) for c in events(rows * 5, 53, "b-")]
    redis = Redis.from_url(redis_url)
    cpu0, t0 = await redis_cpu_seconds(redis), time.perf_counter()
    for start in range(0, len(bulk), 1000):
        await stub.ScoreBatch(fraud_pb2.ScoreBatchRequest(transactions=bulk[start : start + 1000]))
    elapsed, redis_cpu = time.perf_counter() - t0, await redis_cpu_seconds(redis) - cpu0
    print(f"{'ScoreBatch over gRPC, 1000/batch':40s} {len(bulk) / elapsed:9.0f} rows/s   ({len(bulk)} rows; "
          f"Redis CPU {redis_cpu / len(bulk) * 1e6:.0f} us a row)")  # fmt: skip
    await redis.aclose()
    await channel.close()


# The least velocity a row could keep in Redis: one per-minute counter per entity (member, card,
# device, store, IP), bumped and read; KEYS are five a row, ARGV the rows' minutes.
_MINIMAL_VELOCITY = """
local n = 0
for i = 1, #KEYS do
  local minute = ARGV[math.floor((i - 1) / 5) + 1]
  redis.call('HINCRBY', KEYS[i], minute, 1)
  n = n + tonumber(redis.call('HGET', KEYS[i], minute))
end
return n
"""
SCORE_BATCH_TARGET = 100_000


async def floors(models: Path, redis_url: str, rows: int) -> None:
    """Per-row costs no ScoreBatch implementation here can avoid, each measured alone."""
    sample = events(rows, 61, "f-")
    pbs = [context_pb(c) for c in sample]
    t0 = time.perf_counter()
    wire = [
        fraud_pb2.ScoreBatchRequest(transactions=pbs[i : i + 1000]).SerializeToString()
        for i in range(0, len(pbs), 1000)
    ]
    client = (time.perf_counter() - t0) / len(pbs)
    t0 = time.perf_counter()
    for data in wire:
        [context(t) for t in fraud_pb2.ScoreBatchRequest.FromString(data).transactions]
    parse = (time.perf_counter() - t0) / len(pbs)
    model = ModelSlot("fraud", models).read()
    matrix = np.random.default_rng(7).random((len(pbs), len(model.feature_names)))
    t0 = time.perf_counter()
    model.predict(matrix)
    predict = (time.perf_counter() - t0) / len(pbs)
    redis = Redis.from_url(redis_url)
    script = redis.register_script(_MINIMAL_VELOCITY)
    cpu0 = await redis_cpu_seconds(redis)
    for first in range(0, len(sample), 200):
        chunk = sample[first : first + 200]
        keys = [f"floor:{k}" for c in chunk for k in (c.member_id, c.card_hash, c.device_id, c.store_id, c.ip)]
        await script(keys=keys, args=[str(epoch_ms(c.occurred_at) // 60_000) for c in chunk])
    velocity = (await redis_cpu_seconds(redis) - cpu0) / len(sample)
    await redis.aclose()
    total = client + parse + predict + velocity
    budget = (os.cpu_count() or 1) / SCORE_BATCH_TARGET
    for label, cost in (("caller: build and serialise", client), ("fraud_svc: parse into contexts", parse),
                        ("model: batch predict", predict), ("Redis: minimal velocity", velocity)):  # fmt: skip
        print(f"  floor a row, {label:32s} {cost * 1e6:6.1f} us")
    print(f"  floor a row, {'sum (no features, no reply)':32s} {total * 1e6:6.1f} us   "
          f"({os.cpu_count()} cores allow {budget * 1e6:.0f} us a row at {SCORE_BATCH_TARGET:,} rows/s)")  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=3000, help="rows scored per measurement")
    parser.add_argument("--train-rows", type=int, default=200_000, help="rows for the training-time figure")
    parser.add_argument("--model-rows", type=int, default=40_000, help="rows of the model the service serves")
    args = parser.parse_args()
    print(f"fraud benchmark: {os.cpu_count()} cores, LightGBM on one thread")
    with tempfile.TemporaryDirectory() as tmp:
        models = Path(tmp) / "models"
        train_fraud(models, rows=args.model_rows, seed=1)
        train_churn(models, members=2_000, seed=1)
        redis = RedisServer(free_port(), Path(tmp) / "redis", appendonly=False)
        redis.start()
        port = free_port()
        env = {**os.environ, "POINTMESH_DATA_DIR": str(Path(tmp) / "data"), "POINTMESH_REDIS_URL": redis.url,
               "POINTMESH_FRAUD_ADDR": f"127.0.0.1:{port}", "POINTMESH_FRAUD_METRICS_PORT": "0",
               "POINTMESH_MODELS_DIR": str(models), "POINTMESH_LOG_LEVEL": "WARNING"}  # fmt: skip
        server = subprocess.Popen([sys.executable, "-m", "pointmesh.cli", "fraud", "serve"], env=env, cwd=REPO)
        try:
            asyncio.run(in_process(models, redis.url, args.rows))
            wait_port(port, timeout=120)
            asyncio.run(over_grpc(f"127.0.0.1:{port}", redis.url, args.rows))
            asyncio.run(floors(models, redis.url, args.rows * 5))
        finally:
            server.terminate()
            server.wait(timeout=30)
            redis.stop()
        t0 = time.perf_counter()
        data = generate(SynthConfig.for_rows(args.train_rows, seed=9))
        generated = time.perf_counter() - t0
        t0 = time.perf_counter()
        path = train_fraud(Path(tmp) / "big", rows=args.train_rows, seed=9)
        total = time.perf_counter() - t0
        metrics = load_artifact(latest_artifact(Path(tmp) / "big", "fraud") or path).metadata.get("metrics", {})
        print(f"{'train_fraud, ' + str(len(data)) + ' rows':40s} {total:7.1f} s (generation alone {generated:.1f} s; "
              f"held-out PR-AUC {metrics.get('pr_auc', float('nan')):.3f})")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
