"""Points engine and accrual throughput on this machine, printed as figures; never a pass/fail.

* in-process Evaluate of 5-line baskets against a generated 64-rule program (channels, stores,
  regions, categories, SKUs, campaigns, happy hours, tiers, caps, best-of groups), next to the
  same baskets against a base-rate-only program (the floor any evaluation pays: validation,
  time zone, FX, base points);
* RecordPurchase over the mesh at concurrency 32: this process -> ledger_svc -> rules_svc, both
  servers as subprocesses on loopback, next to a no-op gRPC echo and to Evaluate alone.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc

from benchmarks.harness import ECHO_SERVER, closed_loop, describe, rules_and_ledger, wait_port
from pointmesh.redis_server import RedisServer, free_port
from pointmesh.timestamps import to_timestamp
from pointmesh.v1 import common_pb2, ledger_pb2, ledger_pb2_grpc, rules_pb2, rules_pb2_grpc
from rules_svc.domain import Basket, Line, MemberContext
from rules_svc.engine import CompiledProgram
from rules_svc.program import validate_program

CHANNELS = ["pos", "web", "app", "call_centre"]
STORES = [("HEL-01", "FI", "Europe/Helsinki"), ("HEL-02", "FI", "Europe/Helsinki"), ("LIS-01", "PT", "Europe/Lisbon"),
          ("LIS-02", "PT", "Europe/Lisbon"), ("STO-01", "SE", "Europe/Stockholm")]  # fmt: skip
CATEGORIES = [f"cat{i}" for i in range(60)]
START = datetime(2026, 11, 1, tzinfo=UTC)


def big_program(rules: int = 64) -> dict[str, Any]:
    """A realistic program: most rules are gated by place, time or basket contents."""
    rnd = random.Random(7)
    out: list[dict[str, Any]] = []
    for i in range(rules):
        kind = i % 8
        when: dict[str, Any] = {}
        effect: dict[str, Any] = {"multiplier": rnd.choice(["1.5", "2", "3"])}
        caps: dict[str, Any] = {}
        if kind == 0:
            when["categories"] = rnd.sample(CATEGORIES, 2)
        elif kind == 1:
            when["channels"] = [rnd.choice(CHANNELS)]
            when["categories"] = [rnd.choice(CATEGORIES)]
        elif kind == 2:
            when["days_of_week"] = ["sat", "sun"]
            when["regions"] = [rnd.choice(["FI", "PT", "SE"])]
        elif kind == 3:
            hour = rnd.randint(8, 20)  # a happy hour: two hours, somewhere in the day
            when["time_window"] = {"start": f"{hour:02d}:00", "end": f"{hour + 2:02d}:00"}
            when["channels"] = ["pos"]
        elif kind == 4:
            day = START + timedelta(days=rnd.randint(0, 25))
            when["date_range"] = {
                "start": day.replace(tzinfo=None).isoformat(),
                "end": (day + timedelta(days=3)).replace(tzinfo=None).isoformat(),
            }
            caps["per_member_per_campaign"] = 500
        elif kind == 5:
            when["skus"] = [f"sku{rnd.randint(0, 400)}" for _ in range(20)]
            effect = {"bonus_points_per_item": rnd.randint(5, 50)}
        elif kind == 6:
            when["basket_total_at_least"] = {"currency": "EUR", "amount_minor": rnd.choice([5000, 10000, 20000])}
            effect = {"bonus_points": rnd.choice([50, 100, 200])}
        elif i < 16:  # one multiplier per tier, as programs have
            when["tiers"] = ["silver" if i < 8 else "gold"]
            caps["per_receipt"] = 1000
        else:  # offers targeted at a segment, on a few categories
            when["segments"] = [rnd.choice(["students", "families", "outdoor-fans"])]
            when["categories"] = rnd.sample(CATEGORIES, 3)
        rule: dict[str, Any] = {"id": f"r{i:02d}", "priority": i, "when": when, "effect": effect, "caps": caps}
        if kind == 2:
            rule["group"] = "weekend"
        out.append(rule)
    return {
        "program": "bench", "default_timezone": "Europe/Helsinki", "units": ["points", "tier_credits"],
        "channels": CHANNELS, "stores": [{"id": s, "region": r, "timezone": tz} for s, r, tz in STORES],
        "base_rates": [{"currency": "EUR", "points": 1, "per_minor": 100},
                       {"currency": "EUR", "unit": "tier_credits", "points": 1, "per_minor": 100}],
        "fx": {"base_currency": "EUR", "rates": [{"currency": "SEK", "per_base": "11.45"}]},
        "groups": [{"id": "weekend", "mode": "best_of"}], "rules": out,
        "tiers": {"levels": [{"code": "blue", "threshold": 0}, {"code": "silver", "threshold": 1000},
                             {"code": "gold", "threshold": 5000}]},
    }  # fmt: skip


def baskets(n: int, seed: int = 1) -> list[Basket]:
    rnd = random.Random(seed)
    out = []
    for i in range(n):
        lines = tuple(
            Line(f"sku{rnd.randint(0, 400)}", rnd.choice(CATEGORIES), rnd.randint(1, 3), rnd.randint(99, 15000))
            for _ in range(5)
        )
        channel = rnd.choice(CHANNELS)
        store, currency = ("", "EUR") if channel in ("web", "app") else (rnd.choice(STORES)[0], "EUR")
        if store == "STO-01":
            currency = "SEK"
        when = START + timedelta(seconds=rnd.randint(0, 30 * 86400))
        out.append(Basket(channel, store, f"r{i}", currency, sum(ln.amount_minor for ln in lines), lines, when))
    return out


def bench_in_process(n: int) -> tuple[float, float]:
    program = CompiledProgram(validate_program(big_program()), 1)
    floor = big_program(0)
    floor["groups"] = []
    base_only = CompiledProgram(validate_program(floor), 1)
    items = baskets(4000)
    members = [MemberContext(tier=t) for t in ("blue", "silver", "gold")]
    results = {}
    for name, compiled in (("base rates only", base_only), ("64 rules", program)):
        for b in items[:500]:
            compiled.evaluate(b, members[0])  # warm caches the way a running service has them
        t0 = time.perf_counter()
        parts = 0
        for i in range(n):
            parts += len(compiled.evaluate(items[i % len(items)], members[i % 3]).components)
        elapsed = time.perf_counter() - t0
        results[name] = n / elapsed
        print(
            f"Evaluate in-process, {name:16s} {n / elapsed:9.0f} baskets/s   ({n} baskets, {parts / n:.1f} parts each)"
        )
    print(f"{'  64 rules / base rates only':34s} {results['64 rules'] / results['base rates only']:9.2f}")
    return results["64 rules"], results["base rates only"]


def purchase(member_id: str, i: int, at: datetime) -> ledger_pb2.RecordPurchaseRequest:
    rnd = random.Random(i)
    amounts = [rnd.randint(199, 9999) for _ in range(5)]
    eur = [common_pb2.Money(amount_minor=a, currency="EUR") for a in amounts]
    return ledger_pb2.RecordPurchaseRequest(
        member_id=member_id, channel="pos", store_id=rnd.choice(["HEL-01", "LIS-01"]), receipt_id=f"bench-{i}",
        total=common_pb2.Money(amount_minor=sum(amounts), currency="EUR"),
        lines=[ledger_pb2.PurchaseLine(sku=f"s{j}", category=rnd.choice(["outdoor", "socks", "misc"]), quantity=1, amount=m)
               for j, m in enumerate(eur)],
        receipt_time=to_timestamp(at),
    )  # fmt: skip


async def bench_mesh(ledger_addr: str, rules_addr: str, echo_addr: str, calls: int, members: int) -> None:
    ledger = ledger_pb2_grpc.LedgerServiceStub(grpc.aio.insecure_channel(ledger_addr))
    rules = rules_pb2_grpc.RulesServiceStub(grpc.aio.insecure_channel(rules_addr))
    echo = grpc.aio.insecure_channel(echo_addr).unary_unary("/bench.Echo/Echo")
    ids = []
    for i in range(members):
        created = await ledger.CreateMember(
            ledger_pb2.CreateMemberRequest(idempotency_key=common_pb2.IdempotencyKey(namespace="bench", key=f"m{i}"))
        )
        ids.append(created.member.member_id)
    now = datetime.now(UTC)
    requests = [purchase(ids[i % members], i, now - timedelta(minutes=5)) for i in range(calls)]
    evaluate = [
        rules_pb2.EvaluateRequest(program="aurora", basket=rules_pb2.Basket(
            channel=r.channel, store_id=r.store_id, receipt_id=r.receipt_id, total=r.total, receipt_time=r.receipt_time,
            lines=[rules_pb2.BasketLine(sku=ln.sku, category=ln.category, quantity=ln.quantity, amount=ln.amount) for ln in r.lines]))
        for r in requests
    ]  # fmt: skip

    async def ping(i: int) -> object:
        return await echo(b"x" * 64)

    await closed_loop(500, 32, ping)
    elapsed, lat = await closed_loop(calls, 32, ping)
    echo_rate = describe("no-op echo c=32", calls, elapsed, lat)

    async def quote(i: int) -> object:
        return await rules.Evaluate(evaluate[i])

    elapsed, lat = await closed_loop(calls, 32, quote)
    describe("Evaluate over gRPC c=32", calls, elapsed, lat)

    async def record(i: int) -> object:
        response = await ledger.RecordPurchase(requests[i])
        assert response.purchase.status == ledger_pb2.PURCHASE_STATUS_EARNED, response.purchase.status_reason
        return response

    elapsed, lat = await closed_loop(calls, 32, record)
    rate = describe("RecordPurchase mesh c=32", calls, elapsed, lat)
    print(f"{'  RecordPurchase / echo':34s} {rate / echo_rate:9.2f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--baskets", type=int, default=40000)
    parser.add_argument("--calls", type=int, default=4000)
    parser.add_argument("--members", type=int, default=1000)
    args = parser.parse_args()
    print(f"rules benchmark: {os.cpu_count()} cores")
    bench_in_process(args.baskets)
    with tempfile.TemporaryDirectory() as tmp:
        redis = RedisServer(free_port(), Path(tmp) / "redis", appendonly=False)
        redis.start()
        echo_port, rules_port = free_port(), free_port()
        echo = subprocess.Popen([sys.executable, "-c", ECHO_SERVER, f"127.0.0.1:{echo_port}"])
        # The mesh is ledger -> rules: fraud screening off (the harness's default), on the
        # built-in aurora program rather than the harness's base-rate one.
        mesh = rules_and_ledger(
            Path(tmp), redis.url, POINTMESH_PROGRAM="aurora", POINTMESH_RULES_SEED_FILE="builtin:aurora",
            POINTMESH_RULES_ADDR=f"127.0.0.1:{rules_port}",
        )  # fmt: skip
        try:
            with mesh as ledger_addr:
                wait_port(echo_port)
                rules_addr, echo_addr = f"127.0.0.1:{rules_port}", f"127.0.0.1:{echo_port}"
                asyncio.run(bench_mesh(ledger_addr, rules_addr, echo_addr, args.calls, args.members))
        finally:
            echo.terminate()
            echo.wait(timeout=30)
            redis.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
