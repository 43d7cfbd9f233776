"""A reward is paid exactly once when rules_svc is SIGKILLed mid-stream and every event is
delivered again.

rules_svc runs as a real `pointmesh rules serve` child process consuming the ledger's events;
ledger_svc runs in the test on the same private Redis. The consumer is killed after counting
two of a challenge's three purchases, two more purchases arrive while it is down (they wait as
pending accrual, then earn once it is back), the group is rewound to the beginning so every
event comes again, and the process restarts on its data directory. Then the same again, with a
last purchase as a marker that everything redelivered before it was processed.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc

from pointmesh.clock import ManualClock
from pointmesh.config import load_settings
from pointmesh.events import LEDGER_EVENTS, open_bus
from pointmesh.redis_server import RedisServer, free_port
from pointmesh.v1 import ledger_pb2, rules_pb2, rules_pb2_grpc
from rules_svc.game_worker import GROUP
from tests.conftest import pointmesh_process, start_ledger, stop_ledger, wait_for_port
from tests.gamification.conftest import START, write_program
from tests.ledger.helpers import create_member
from tests.mesh.helpers import purchase_request
from tests.waiting import until


@contextmanager
def _rules(env: dict[str, str], log: Path) -> Iterator[int]:
    with pointmesh_process(["rules", "serve"], env, log) as process:
        wait_for_port(int(env["POINTMESH_RULES_ADDR"].rpartition(":")[2]), timeout=30)
        yield process.pid


async def test_a_killed_consumer_and_redelivered_events_never_pay_twice(tmp_path: Path) -> None:
    redis = RedisServer(free_port(), tmp_path / "redis")
    redis.start()
    rules_port, ledger_port = free_port(), free_port()
    env = {
        "POINTMESH_DATA_DIR": str(tmp_path / "rules"), "POINTMESH_RULES_ADDR": f"127.0.0.1:{rules_port}",
        "POINTMESH_RULES_METRICS_PORT": "0", "POINTMESH_RULES_SEED_FILE": str(write_program(tmp_path)),
        "POINTMESH_REDIS_URL": redis.url, "POINTMESH_LEDGER_ADDR": f"127.0.0.1:{ledger_port}",
        "POINTMESH_PROGRAM": "meshmart", "POINTMESH_GAMIFICATION_CONSUMER": "true", "POINTMESH_GRACE_SECONDS": "1",
    }  # fmt: skip
    clock = ManualClock(START)
    ledger = await start_ledger(
        tmp_path / "ledger", redis.url, clock, ledger_addr=f"127.0.0.1:{ledger_port}",
        rules_addr=f"127.0.0.1:{rules_port}", program="meshmart", rules_deadline_seconds=1.0,
        maintenance_interval_seconds=0.3,
    )  # fmt: skip
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{rules_port}")
    rules = rules_pb2_grpc.RulesServiceStub(channel)
    bus = open_bus(load_settings({}, redis_url=redis.url))
    log = tmp_path / "rules.log"
    try:
        member = (await create_member(ledger.stub)).member_id

        async def buy(category: str = "misc") -> ledger_pb2.RecordPurchaseResponse:
            clock.advance(timedelta(hours=1))
            return await ledger.stub.RecordPurchase(
                purchase_request(member, [(category, 1000, 1)], at=clock.now(), channel="pos")
            )

        async def progress() -> rules_pb2.GetMemberProgressResponse:
            return await rules.GetMemberProgress(
                rules_pb2.GetMemberProgressRequest(program="meshmart", member_id=member), timeout=5
            )

        def item(found: rules_pb2.GetMemberProgressResponse, item_id: str) -> rules_pb2.GameProgress:
            return next(i for i in found.items if i.item_id == item_id)

        async def counted(item_id: str, n: int) -> bool:
            try:
                return item(await progress(), item_id).progress >= n
            except grpc.aio.AioRpcError:
                return False  # still starting

        with _rules(env, log) as pid:
            await buy()
            await buy()
            await until(lambda: counted("january-trio", 2), 30)
            os.kill(pid, signal.SIGKILL)
        down = [await buy(), await buy("books")]
        assert {r.purchase.status for r in down} == {ledger_pb2.PURCHASE_STATUS_PENDING_ACCRUAL}
        await bus.rewind(LEDGER_EVENTS, GROUP, datetime(2000, 1, 1, tzinfo=UTC))

        with _rules(env, log) as pid:
            # The waiting purchases earn once rules_svc answers again; their events complete the trio.
            async def paid() -> bool:
                try:
                    return (await progress()).rewards_paid_points == 200
                except grpc.aio.AioRpcError:
                    return False

            await until(paid, 60)
            os.kill(pid, signal.SIGKILL)
        await bus.rewind(LEDGER_EVENTS, GROUP, datetime(2000, 1, 1, tzinfo=UTC))

        with _rules(env, log):
            await buy("garden")  # a marker: once it counts, everything before it was handled again
            await until(lambda: counted("explorer", 3), 60)
            found = await progress()
            trio = item(found, "january-trio")
            assert (trio.progress, trio.completions) == (3, 1)
            # Five purchases, each counted once however often its event came.
            assert item(found, "winter-ten").progress == 5
            assert (found.rewards_paid_points, found.rewards_pending_points) == (200, 0)
            await asyncio.sleep(2.5)  # one more retry pass of the reward payer: still nothing more
            page = await ledger.stub.ListEntries(ledger_pb2.ListEntriesRequest(member_id=member))
            rewards = [(e.reference, e.points) for e in page.entries if ": " in e.reference]
            assert rewards == [("january-trio: Three purchases in January", 200)]
    finally:
        await channel.close()
        await bus.close()
        await stop_ledger(ledger)
        redis.stop()
