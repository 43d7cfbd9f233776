"""Corruptions a real bug could leave that the per-account sums cannot see; reconcile must name each.

Each test writes a real SQLite shard through the ledger, corrupts it by hand (the way a bug
would: a row lost, a status or count wrong, with the sums kept consistent so the older checks
stay quiet) and runs reconcile, in-process and as `pointmesh ledger reconcile`, which must
exit non-zero. The clean cases next to them show the checks do not cry wolf: a credit pending
review through Earn's own flag, events the retention pass deleted.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest

from ledger_svc.reconcile import reconcile
from pointmesh.clock import ManualClock
from pointmesh.redis_server import RedisServer, free_port
from pointmesh.v1 import ledger_pb2
from tests.conftest import (
    LedgerUnderTest,
    pointmesh_cli,
    start_ledger,
    start_rules,
    stop_ledger,
    stop_rules,
)
from tests.ledger.helpers import create_member, earn, key, place_hold, redeem
from tests.mesh.conftest import PROGRAM, START
from tests.mesh.helpers import purchase_request


@pytest.fixture
async def sqlite_ledger(tmp_path: Path, redis_server: RedisServer) -> AsyncIterator[LedgerUnderTest]:
    running = await start_ledger(tmp_path / "data", redis_server.url, store="sqlite")
    yield running
    await stop_ledger(running)


@pytest.fixture
async def held_for_review(tmp_path: Path, redis_server: RedisServer) -> AsyncIterator[LedgerUnderTest]:
    """fraud_svc away: large redemptions fail closed to review (the default policy)."""
    running = await start_ledger(
        tmp_path / "data", redis_server.url, store="sqlite", fraud_screening=True,
        fraud_addr=f"127.0.0.1:{free_port()}",
    )  # fmt: skip
    yield running
    await stop_ledger(running)


@pytest.fixture
async def reviewing(tmp_path: Path, redis_server: RedisServer) -> AsyncIterator[LedgerUnderTest]:
    """rules_svc and a ledger whose fraud_svc is away, with purchases failing closed to review."""
    clock = ManualClock(START)
    port = free_port()
    rules = await start_rules(tmp_path / "rules", clock, rules_addr=f"127.0.0.1:{port}", rules_seed_file=str(PROGRAM))
    running = await start_ledger(
        tmp_path / "data", redis_server.url, clock, store="sqlite", rules_addr=f"127.0.0.1:{port}",
        program="meshmart", rules_deadline_seconds=2.0, fraud_screening=True, fraud_addr=f"127.0.0.1:{free_port()}",
        fraud_unavailable_purchase="review",
    )  # fmt: skip
    yield running
    await stop_ledger(running)
    await stop_rules(rules)


def shard_db(ledger: LedgerUnderTest, member_id: str) -> sqlite3.Connection:
    path = Path(ledger.app.store.data_dir) / f"ledger-shard-{ledger.app.service.shard_of(member_id):03d}.sqlite"
    return sqlite3.connect(path, isolation_level=None)


async def differences(ledger: LedgerUnderTest) -> list[str]:
    report = await reconcile(ledger.app.store, ledger.clock.now())
    return [d.describe() for d in report.differences]


def cli_exit(ledger: LedgerUnderTest) -> tuple[int, str]:
    done = pointmesh_cli(
        "ledger", "reconcile",
        env={"POINTMESH_DATA_DIR": str(ledger.app.settings.data_dir), "POINTMESH_STORE": "sqlite"},
    )  # fmt: skip
    return done.returncode, done.stdout + done.stderr


async def assert_caught(ledger: LedgerUnderTest, *words: str) -> None:
    """In-process reconcile names the corruption, and the CLI (run beside the live ledger, on
    the same files) exits 1 with it."""
    found = await differences(ledger)
    assert any(all(w in d for w in words) for d in found), found
    code, out = cli_exit(ledger)
    assert code == 1 and all(w in out for w in words), out


async def _members_on_two_shards(ledger: LedgerUnderTest) -> tuple[str, str]:
    a = (await create_member(ledger.stub)).member_id
    while True:
        b = (await create_member(ledger.stub)).member_id
        if ledger.app.service.shard_of(b) != ledger.app.service.shard_of(a):
            return a, b


# 2. Lots: one lot's error cancelled by another's in the member's sum ------------------------


async def test_a_lot_above_its_original_cancelled_by_one_below_zero(sqlite_ledger: LedgerUnderTest) -> None:
    ledger = sqlite_ledger
    m = (await create_member(ledger.stub)).member_id
    first = (await earn(ledger.stub, m, 100)).lot_id
    second = (await earn(ledger.stub, m, 100)).lot_id
    await redeem(ledger.stub, m, 50)
    assert await differences(ledger) == []
    db = shard_db(ledger, m)
    # A consumption that took from the wrong lot: the member's sum is unchanged.
    db.execute("UPDATE lots SET remaining=remaining+60 WHERE lot_id=?", (second,))  # 160 of 100
    db.execute("UPDATE lots SET remaining=remaining-60 WHERE lot_id=?", (first,))  # -10
    found = await differences(ledger)
    assert f"shard {ledger.app.service.shard_of(m)}: lot of {m}:points outside 0..100 points {second}:" \
           " expected 100, found 160" in found, found  # fmt: skip
    assert any(first in d and "found -10" in d for d in found), found
    await assert_caught(ledger, "outside 0..100 points", second)


# 3. Journal legs whose transaction row is gone ---------------------------------------------


async def test_journal_legs_whose_transaction_row_was_lost(sqlite_ledger: LedgerUnderTest) -> None:
    ledger = sqlite_ledger
    m = (await create_member(ledger.stub)).member_id
    tx = (await earn(ledger.stub, m, 100)).transaction.transaction_id
    await earn(ledger.stub, m, 30)
    shard_db(ledger, m).execute("DELETE FROM transactions WHERE tx_id=?", (tx,))
    found = await differences(ledger)
    assert f"shard {ledger.app.service.shard_of(m)}: journal legs without their transaction row {tx}:" \
           " expected 0, found 2" in found, found  # fmt: skip
    await assert_caught(ledger, "journal legs without their transaction row", tx)


# 4. An event lost before it was published ---------------------------------------------------


async def test_an_outbox_event_lost_before_it_was_published(sqlite_ledger: LedgerUnderTest) -> None:
    """One earn's event of several (the member's other events stay), so no count could see it."""
    ledger = sqlite_ledger
    m = (await create_member(ledger.stub)).member_id
    await earn(ledger.stub, m, 100)
    lost = (await earn(ledger.stub, m, 40)).transaction.transaction_id
    await place_hold(ledger.stub, m, 10)
    await redeem(ledger.stub, m, 5)
    assert await differences(ledger) == []
    db = shard_db(ledger, m)
    gone = db.execute(
        "DELETE FROM outbox WHERE json_extract(payload, '$.data.transaction_id')=? AND member_id=?", (lost, m)
    ).rowcount
    assert gone == 1
    assert db.execute("SELECT COUNT(*) FROM outbox WHERE member_id=?", (m,)).fetchone()[0] == 3
    assert await differences(ledger) == [
        f"shard {ledger.app.service.shard_of(m)}: transaction without its outbox event (never published) {lost}:"
        " expected 1, found 0"
    ]
    await assert_caught(ledger, "without its outbox event", lost)


async def test_events_the_retention_pass_deleted_are_not_reported(sqlite_ledger: LedgerUnderTest) -> None:
    ledger = sqlite_ledger
    m = (await create_member(ledger.stub)).member_id
    old = (await earn(ledger.stub, m, 100)).transaction.transaction_id
    db = shard_db(ledger, m)

    def unrelayed() -> int:
        return int(db.execute("SELECT COUNT(*) FROM outbox WHERE relayed_at IS NULL").fetchone()[0])

    deadline = time.monotonic() + 20
    while unrelayed():
        assert time.monotonic() < deadline, "the relay did not publish the events"
        await asyncio.sleep(0.05)
    ledger.clock.advance(timedelta(days=40))
    await ledger.app.service.purge_expired_keys(timedelta(days=35))
    assert db.execute("SELECT COUNT(*) FROM transactions WHERE tx_id=?", (old,)).fetchone()[0] == 1
    assert db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0] == 0
    await earn(ledger.stub, m, 10)  # a fresh event and idempotency record after the purge
    assert await differences(ledger) == []


# 1. Fraud reviews and the points they hold --------------------------------------------------


async def _held_redemption(ledger: LedgerUnderTest) -> tuple[str, ledger_pb2.RedeemResponse]:
    m = (await create_member(ledger.stub)).member_id
    await earn(ledger.stub, m, 10_000)
    got = await redeem(ledger.stub, m, 6_000)
    assert got.hold.hold_id and got.screening.review_id, got
    assert await differences(ledger) == []
    return m, got


async def test_a_hold_whose_fraud_review_was_lost(held_for_review: LedgerUnderTest) -> None:
    ledger = held_for_review
    m, got = await _held_redemption(ledger)
    shard_db(ledger, m).execute("DELETE FROM reviews WHERE review_id=?", (got.screening.review_id,))
    # The points stay reserved for ever: VoidHold refuses a review's hold, maintenance skips it.
    ledger.clock.advance(timedelta(days=30))
    await ledger.app.service.run_maintenance()
    assert await differences(ledger) == [
        f"shard {ledger.app.service.shard_of(m)}: hold placed for fraud review {got.screening.review_id}, which is"
        f" missing {got.hold.hold_id}: expected 0, found 6000"
    ]
    await assert_caught(ledger, "hold placed for fraud review", "which is missing", got.hold.hold_id)


async def test_a_hold_whose_fraud_review_is_decided_but_still_placed(held_for_review: LedgerUnderTest) -> None:
    ledger = held_for_review
    m, got = await _held_redemption(ledger)
    db = shard_db(ledger, m)
    db.execute(
        "UPDATE reviews SET status='APPROVED', body=json_set(body, '$.status', 'APPROVED') WHERE review_id=?",
        (got.screening.review_id,),
    )
    await assert_caught(ledger, "hold placed for fraud review", "which is APPROVED", got.hold.hold_id)


async def test_an_open_review_whose_hold_was_voided(held_for_review: LedgerUnderTest) -> None:
    """The hold settled around its review, its reservation given back with it: the sums agree,
    but the review can never be decided."""
    ledger = held_for_review
    m, got = await _held_redemption(ledger)
    db = shard_db(ledger, m)
    db.execute("UPDATE holds SET status='VOIDED' WHERE hold_id=?", (got.hold.hold_id,))
    db.execute("UPDATE accounts SET reserved=reserved-6000 WHERE account=?", (f"member:{m}:points",))
    await assert_caught(ledger, f"open fraud review's hold {got.hold.hold_id} is VOIDED", got.screening.review_id)


async def test_a_hold_of_a_finished_transfer_left_placed(sqlite_ledger: LedgerUnderTest) -> None:
    ledger = sqlite_ledger
    a, b = await _members_on_two_shards(ledger)
    await earn(ledger.stub, a, 100)
    done = await ledger.stub.Transfer(
        ledger_pb2.TransferRequest(idempotency_key=key(), source_member_id=a, destination_member_id=b, points=40)
    )
    db = shard_db(ledger, a)
    (hold_id,) = db.execute("SELECT hold_id FROM sagas WHERE saga_id=?", (done.transfer_id,)).fetchone()
    assert await differences(ledger) == []
    db.execute("UPDATE holds SET status='PLACED', captured=0 WHERE hold_id=?", (hold_id,))
    db.execute("UPDATE accounts SET reserved=reserved+40 WHERE account=?", (f"member:{a}:points",))
    await assert_caught(ledger, f"hold placed for transfer {done.transfer_id}, which is DONE", hold_id)


async def _reviewed_purchase(ledger: LedgerUnderTest) -> tuple[str, str]:
    m = (await create_member(ledger.stub)).member_id
    request = purchase_request(m, [("grocery", 5_000, 1)], at=ledger.clock.now())
    got = (await ledger.stub.RecordPurchase(request)).purchase
    assert got.screening.review_id, got
    assert await differences(ledger) == []
    return m, got.screening.review_id


async def test_a_purchase_credit_whose_review_was_lost(reviewing: LedgerUnderTest) -> None:
    ledger = reviewing
    m, review_id = await _reviewed_purchase(ledger)
    db = shard_db(ledger, m)
    held = db.execute("SELECT earn_tx FROM lots WHERE member_id=? AND pending_review=1", (m,)).fetchall()
    assert held
    db.execute("DELETE FROM reviews WHERE review_id=?", (review_id,))
    ledger.clock.advance(timedelta(days=400))
    found = await differences(ledger)
    assert len(found) == len(held), found
    for (earn_tx,) in held:
        assert any(f"pending credit held for fraud review {review_id}, which is missing {earn_tx}" in d for d in found)
    await assert_caught(ledger, "pending credit held for fraud review", review_id)


async def test_an_open_review_whose_credit_is_no_longer_held(reviewing: LedgerUnderTest) -> None:
    """The credit's review flag lost: the release job would now pay it out under an open review."""
    ledger = reviewing
    m, review_id = await _reviewed_purchase(ledger)
    shard_db(ledger, m).execute("UPDATE lots SET pending_review=0 WHERE member_id=?", (m,))
    await assert_caught(ledger, "open fraud review's pending credit", "no longer held for review", review_id)


async def test_an_open_review_whose_credit_is_gone(reviewing: LedgerUnderTest) -> None:
    ledger = reviewing
    m, review_id = await _reviewed_purchase(ledger)
    db = shard_db(ledger, m)
    # The lots gone with the pending balance they made up: every sum still agrees.
    db.execute("DELETE FROM lots WHERE member_id=?", (m,))
    db.execute("UPDATE accounts SET balance=0 WHERE account LIKE ?", (f"pending:{m}:%",))
    db.execute("DELETE FROM entries WHERE account LIKE ? OR tx_id IN (SELECT tx_id FROM transactions WHERE member_id=?)",
               (f"pending:{m}:%", m))  # fmt: skip
    db.execute("DELETE FROM transactions WHERE member_id=?", (m,))
    db.execute("UPDATE accounts SET balance=0 WHERE account LIKE 'funding:%'")
    await assert_caught(ledger, "open fraud review's pending credit", "is missing", review_id)


async def test_a_credit_pending_review_through_earn_alone_is_not_reported(sqlite_ledger: LedgerUnderTest) -> None:
    """Earn's own `pending_review` waits for ReleasePending with no review item: that is fine."""
    ledger = sqlite_ledger
    m = (await create_member(ledger.stub)).member_id
    await earn(ledger.stub, m, 80, pending_review=True)
    assert await differences(ledger) == []
    code, out = cli_exit(ledger)
    assert code == 0, out


async def test_an_earn_whose_member_leg_landed_in_another_unit(sqlite_ledger: LedgerUnderTest) -> None:
    """The program's points funding debited 100 and the member credited 100 tier credits: every
    account still equals its entries and every unit's lots its balance, and -100 points + 100
    tier credits summed to zero, per transaction and across shards."""
    m = (await create_member(sqlite_ledger.stub)).member_id
    await earn(sqlite_ledger.stub, m, 5, unit="tier_credits")
    got = await earn(sqlite_ledger.stub, m, 100)
    tx, lot = got.transaction.transaction_id, got.lot_id
    assert await differences(sqlite_ledger) == []
    db = shard_db(sqlite_ledger, m)
    db.execute("BEGIN")
    db.execute("UPDATE entries SET account=? WHERE tx_id=? AND account=?",
               (f"member:{m}:tier_credits", tx, f"member:{m}:points"))  # fmt: skip
    db.execute("UPDATE accounts SET balance=balance-100 WHERE account=?", (f"member:{m}:points",))
    db.execute("UPDATE accounts SET balance=balance+100 WHERE account=?", (f"member:{m}:tier_credits",))
    db.execute("UPDATE lots SET unit='tier_credits' WHERE lot_id=?", (lot,))
    db.execute("COMMIT")

    found = await differences(sqlite_ledger)

    assert any("transaction does not sum to zero" in d and tx in d for d in found), found
    assert any("the points accounts together do not sum to zero" in d for d in found), found
    assert any("the tier_credits accounts together do not sum to zero" in d for d in found), found
