"""Bulk purchases through Kafka: 20,000 purchases written to the ingest topic by
`pointmesh ingest produce`, consumed by ledger_svc (a real process) through the accrual path;
the ledger is SIGKILLed mid-run and restarted. Every balance ends exactly at the sum computed
here from the program's one rule, so nothing was lost and nothing earned twice."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from google.protobuf import json_format

from pointmesh.clients import ledger_stub
from pointmesh.redis_server import RedisServer, free_port
from pointmesh.v1 import common_pb2, ledger_pb2
from tests.conftest import REPO, RulesUnderTest, pointmesh_cli, start_rules, stop_rules, wait_for_port
from tests.ledger.helpers import key, ts
from tests.waiting import until

PURCHASES = 20_000
MEMBERS = 200
PROGRAM = """
program: bulkmart
default_timezone: Europe/Helsinki
units: [points]
channels: [franchise]
stores: [{id: F-001, region: FI, timezone: Europe/Helsinki}]
base_rates: [{currency: EUR, unit: points, points: 1, per_minor: 100}]
policy: {rounding: floor, expiry_days: 365, max_lateness_days: 30}
"""


@pytest.fixture
async def bulk_rules(tmp_path: Path) -> AsyncIterator[RulesUnderTest]:
    program = tmp_path / "bulkmart.yaml"
    program.write_text(PROGRAM)
    rules = await start_rules(tmp_path / "rules", rules_addr=f"127.0.0.1:{free_port()}", rules_seed_file=str(program))
    yield rules
    await stop_rules(rules)


class LedgerProcess:
    def __init__(self, env: dict[str, str], port: int) -> None:
        self.env, self.port = env, port
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "pointmesh.cli", "ledger", "serve"], env=self.env, cwd=REPO)
        wait_for_port(self.port, 60)

    def kill(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)


async def test_twenty_thousand_purchases_over_kafka_survive_a_killed_ledger(
    tmp_path: Path, redis_server: RedisServer, kafka_bootstrap: str, bulk_rules: RulesUnderTest
) -> None:
    port = free_port()
    env = {
        **os.environ, "POINTMESH_DATA_DIR": str(tmp_path / "data"), "POINTMESH_REDIS_URL": redis_server.url,
        "POINTMESH_LEDGER_ADDR": f"127.0.0.1:{port}", "POINTMESH_LEDGER_METRICS_PORT": "0",
        "POINTMESH_RULES_ADDR": bulk_rules.address, "POINTMESH_PROGRAM": "bulkmart", "POINTMESH_EVENT_BUS": "kafka",
        "POINTMESH_KAFKA_BOOTSTRAP": kafka_bootstrap, "POINTMESH_INGEST_CONSUMER": "true",
        "POINTMESH_FRAUD_SCREENING": "false", "POINTMESH_LOG_LEVEL": "WARNING", "POINTMESH_RULES_DEADLINE_SECONDS": "5",
    }  # fmt: skip
    ledger = LedgerProcess(env, port)
    ledger.start()
    try:
        stub = ledger_stub(f"127.0.0.1:{port}", default_timeout_seconds=10)
        members = [(await stub.CreateMember(ledger_pb2.CreateMemberRequest(idempotency_key=key()))).member.member_id
                   for _ in range(MEMBERS)]  # fmt: skip
        rng = random.Random(7)
        when = datetime.now(UTC) - timedelta(hours=2)
        expected = dict.fromkeys(members, 0)
        lines = []
        for i in range(PURCHASES):
            member, amount = members[rng.randrange(MEMBERS)], rng.randrange(1, 40_000)
            expected[member] += amount // 100  # the program's only rule: 1 point per EUR, floored
            request = ledger_pb2.RecordPurchaseRequest(
                member_id=member, channel="franchise", store_id="F-001", receipt_id=f"z-{i}",
                total=common_pb2.Money(amount_minor=amount, currency="EUR"),
                lines=[ledger_pb2.PurchaseLine(sku="s", category="c", quantity=1,
                                               amount=common_pb2.Money(amount_minor=amount, currency="EUR"))],
                receipt_time=ts(when + timedelta(milliseconds=i)),
            )  # fmt: skip
            lines.append(json_format.MessageToJson(request, indent=None))
        feed = tmp_path / "purchases.jsonl"
        feed.write_text("\n".join([*lines, *lines[:500], "{not json"]) + "\n")  # a resent tail, and one bad line
        produced = pointmesh_cli("ingest", "produce", str(feed), env=env, timeout=300)
        assert produced.returncode == 1 and f"{PURCHASES + 500} purchases" in produced.stdout, produced
        assert f"{feed}:{PURCHASES + 501}: not a purchase" in produced.stderr

        async def total() -> int:
            got = await asyncio.gather(*(stub.GetBalance(ledger_pb2.GetBalanceRequest(member_id=m)) for m in members))
            return sum(b.balance.balance_points for b in got)

        async def reached(points: int) -> bool:
            return await total() >= points

        want = sum(expected.values())
        await until(lambda: reached(want // 4), 300, pause=0.2)
        ledger.kill()  # mid-run, like a power cut: offsets of the batch in flight were never committed
        ledger.start()
        stub = ledger_stub(f"127.0.0.1:{port}", default_timeout_seconds=10)
        await until(lambda: reached(want), 600, pause=0.5)
        await asyncio.sleep(2)  # anything still redelivered now must replay, not earn
        balances = await asyncio.gather(*(stub.GetBalance(ledger_pb2.GetBalanceRequest(member_id=m)) for m in members))
        assert {m: b.balance.balance_points for m, b in zip(members, balances, strict=True)} == expected
    finally:
        ledger.stop()
