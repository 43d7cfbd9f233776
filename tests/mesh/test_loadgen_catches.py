"""`pointmesh loadgen` must call a run exact only when it is: a ledger that misbehaves in a way
the per-member sums alone cannot see makes `report.ok` False. Each test injects one fault into
the in-process ledger of a real mesh: a purchase silently dropped from an IngestBatch stream, a
purchase refused with no fraud DENY behind it, points held for review posted as spendable (and
the reverse). The expectation stays the generator's own; only its comparisons got finer."""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

import ledger_svc.accrual as accrual_mod
from ledger_svc.purchases import PurchaseStatus
from ledger_svc.screening import FraudScreen, Screening, ScreeningRequest, UnavailablePolicy, Verdict
from ledger_svc.server import LedgerServicer
from loadtests.loadgen import UnmodelledProgram, model, run
from pointmesh.clock import SystemClock
from pointmesh.redis_server import RedisServer, free_port
from tests.conftest import LedgerUnderTest, RulesUnderTest, start_ledger, start_rules, stop_ledger, stop_rules
from tests.mesh.conftest import LOADGEN

PURCHASES, MEMBERS = 120, 40


def _verdict(r: ScreeningRequest) -> Verdict:
    """A fake fraud_svc, deterministic per purchase: about one in five denied, one in five held."""
    pick = zlib.crc32(r.event_id.encode()) % 5
    return Verdict.DENY if pick == 0 else Verdict.REVIEW if pick == 1 else Verdict.ALLOW


class FakeFraud:
    async def screen(self, r: ScreeningRequest) -> Screening:
        return Screening(_verdict(r), True, 0.5, ("fake",), "fake")

    async def screen_many(self, rs: Sequence[ScreeningRequest]) -> list[Screening]:
        return [await self.screen(r) for r in rs]


def _screened(ledger: LedgerUnderTest, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ledger.app.service, "fraud", FraudScreen(FakeFraud(), UnavailablePolicy()))


async def _run(ledger: LedgerUnderTest, rules: RulesUnderTest, seed: int, unary: bool = False):  # type: ignore[no-untyped-def]
    return await run(ledger.address, rules.address, "loadgen", purchases=PURCHASES, members=MEMBERS, seed=seed,
                     concurrency=1, batch=60, unary=unary)  # fmt: skip


async def test_a_purchase_the_ledger_drops_from_the_stream_is_a_mismatch(
    plain_mesh: tuple[LedgerUnderTest, RulesUnderTest], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The last purchase of every chunk never posted and never reported: it is in neither the
    books nor the generator's sums, so only the stream's own accounting can show it."""
    ledger, rules = plain_mesh
    original = LedgerServicer._ingest_chunk

    async def lossy(self, chunk, answer):  # type: ignore[no-untyped-def]
        await original(self, chunk[:-1], answer)

    monkeypatch.setattr(LedgerServicer, "_ingest_chunk", lossy)
    report = await _run(ledger, rules, seed=3)
    assert not report.ok and report.reconcile_differences == 0
    assert report.mismatches == [
        "IngestBatch from lg-3-0: sent 60 purchases, the ledger received 59",
        "1 purchases with no answer (in neither purchases nor failures): lg-3-59",
        "IngestBatch from lg-3-60: sent 60 purchases, the ledger received 59",
        "1 purchases with no answer (in neither purchases nor failures): lg-3-119",
    ]


async def test_a_purchase_counted_as_received_but_never_answered_is_a_mismatch(
    plain_mesh: tuple[LedgerUnderTest, RulesUnderTest], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same loss with the `received` count right: every index must be answered once."""
    ledger, rules = plain_mesh
    original = LedgerServicer._ingest_chunk

    async def lossy(self, chunk, answer):  # type: ignore[no-untyped-def]
        await original(self, chunk[:-1], answer)
        answer.summary.received += 1

    monkeypatch.setattr(LedgerServicer, "_ingest_chunk", lossy)
    report = await _run(ledger, rules, seed=3)
    assert report.mismatches == [
        "1 purchases with no answer (in neither purchases nor failures): lg-3-59",
        "1 purchases with no answer (in neither purchases nor failures): lg-3-119",
    ]


@pytest.mark.parametrize("unary", [False, True], ids=["ingest-batch", "unary"])
@pytest.mark.parametrize("verdict", [None, Verdict.ALLOW], ids=["not-screened", "allowed"])
async def test_a_refusal_without_a_fraud_deny_is_a_mismatch(
    plain_mesh: tuple[LedgerUnderTest, RulesUnderTest],
    monkeypatch: pytest.MonkeyPatch,
    unary: bool,
    verdict: Verdict | None,
) -> None:
    """fraud_svc denies some purchases (refused: expected, no mismatch); a ledger bug refuses
    others it did not deny. Nothing was earned for either, so every balance still adds up: only
    the refusal's verdict shows the bug, and it names exactly the purchases the bug refused."""
    ledger, rules = plain_mesh
    _screened(ledger, monkeypatch)
    original = accrual_mod.accrue
    bugged: list[str] = []

    def refusing(book, record, quote, screening=None, review_id="", state=None):  # type: ignore[no-untyped-def]
        if screening is not None and screening.verdict is Verdict.ALLOW and len(bugged) < 7:
            bugged.append(record.receipt_id)
            kept = None if verdict is None else screening
            refused = replace(record, status=PurchaseStatus.REFUSED, status_reason="bug", screening=kept)
            accrual_mod.save_purchase(book, refused)
            return refused
        return original(book, record, quote, screening, review_id, state)

    monkeypatch.setattr(accrual_mod, "accrue", refusing)
    report = await _run(ledger, rules, seed=4, unary=unary)
    assert len(bugged) == 7 and report.refused > 7  # the fake's denials were refused too
    want = "UNSPECIFIED" if verdict is None else "ALLOW"
    assert sorted(report.mismatches) == sorted(
        f"purchase {r} refused without a fraud DENY verdict (verdict SCREENING_VERDICT_{want})" for r in bugged
    )


@pytest.mark.parametrize("unary", [False, True], ids=["ingest-batch", "unary"])
async def test_points_held_for_review_posted_as_spendable_are_a_mismatch(
    plain_mesh: tuple[LedgerUnderTest, RulesUnderTest], monkeypatch: pytest.MonkeyPatch, unary: bool
) -> None:
    """A ledger bug records the REVIEW verdict but posts the points as spendable: posted plus
    pending is still right, posted and pending each are not."""
    ledger, rules = plain_mesh
    _screened(ledger, monkeypatch)
    original = accrual_mod.accrue
    members: set[str] = set()

    def spendable(book, record, quote, screening=None, review_id="", state=None):  # type: ignore[no-untyped-def]
        if screening is None or screening.verdict is not Verdict.REVIEW:
            return original(book, record, quote, screening, review_id, state)
        members.add(record.member_id)
        saved = replace(original(book, record, quote, None, review_id, state), screening=screening)
        accrual_mod.save_purchase(book, saved)
        return saved

    monkeypatch.setattr(accrual_mod, "accrue", spendable)
    report = await _run(ledger, rules, seed=5, unary=unary)
    assert report.held > 0 and members
    assert {line.split(" ")[0] for line in report.mismatches if not line.startswith("all members")} == members
    assert [line.split(":")[0] for line in report.mismatches if line.startswith("all members")] == [
        "all members points"
    ] * 2  # the books' posted total grew by the held points, the pending total by nothing


async def test_an_allowed_purchase_left_pending_is_a_mismatch(
    plain_mesh: tuple[LedgerUnderTest, RulesUnderTest], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reverse: fraud_svc allowed the purchase, the ledger held its points as pending."""
    ledger, rules = plain_mesh
    _screened(ledger, monkeypatch)
    original = accrual_mod.accrue
    members: set[str] = set()

    def held(book, record, quote, screening=None, review_id="", state=None):  # type: ignore[no-untyped-def]
        if screening is None or screening.verdict is not Verdict.ALLOW:
            return original(book, record, quote, screening, review_id, state)
        members.add(record.member_id)
        saved = replace(original(book, record, quote, replace(screening, verdict=Verdict.REVIEW), review_id, state),
                        screening=screening)  # fmt: skip
        accrual_mod.save_purchase(book, saved)
        return saved

    monkeypatch.setattr(accrual_mod, "accrue", held)
    report = await _run(ledger, rules, seed=6)
    assert members
    assert {line.split(" ")[0] for line in report.mismatches if not line.startswith("all members")} == members
    assert sum(line.startswith("all members") for line in report.mismatches) == 2


def test_a_program_that_releases_points_later_is_refused() -> None:
    """Points released after some days post as pending whatever the verdict: the generator's
    posted/pending split cannot model that, so it refuses the program up front."""
    import yaml

    document = yaml.safe_load(LOADGEN.read_text())
    document["policy"]["release_after_days"] = 3
    with pytest.raises(UnmodelledProgram, match="release_after_days"):
        model(document)


async def test_purchases_that_waited_for_the_points_engine_are_settled_once_they_earn(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """While the ledger sees rules_svc as down (its breaker tripped, as after a deadline), every
    purchase is accepted to wait, and earns when the ledger retries it: the run must settle them
    then, not count their points before they are there (nor call the run exact without them)."""
    port = free_port()
    clock = SystemClock()
    rules = await start_rules(tmp_path / "rules", clock, rules_addr=f"127.0.0.1:{port}", rules_seed_file=str(LOADGEN))
    ledger = await start_ledger(tmp_path / "ledger", redis_server.url, clock, rules_addr=f"127.0.0.1:{port}",
                                program="loadgen", rules_deadline_seconds=5.0, maintenance_interval_seconds=0.5)  # fmt: skip
    accrual = ledger.app.service.accrual
    tripping = True

    async def trip_while_running() -> None:
        while tripping:
            accrual.engine_down("the test", RuntimeError("rules_svc paused"))
            await asyncio.sleep(0.2)

    tripper = asyncio.create_task(trip_while_running())
    try:
        running = asyncio.create_task(_run(ledger, rules, seed=5, unary=True))
        await asyncio.sleep(2.0)
        tripping = False
        report = await running
    finally:
        tripping = False
        await tripper
        await stop_ledger(ledger)
        await stop_rules(rules)

    assert report.ok, report.mismatches[:5]
    assert report.waited > 0


@pytest.mark.parametrize(
    ("change", "said"),
    [
        (lambda d: d.update(channels=["pos", "web"]), "takes no app receipts"),
        (lambda d: d.pop("stores"), "lists no stores"),
        (lambda d: d["policy"].update(max_lateness_days=1), "refuses receipts 2 days late"),
        (
            lambda d: d.update(
                gamification={"achievements": [{"id": "first", "name": "First purchase", "reward": {"points": 50}}]}
            ),
            "gamification",
        ),
    ],
    ids=["no-app-channel", "no-stores", "same-day-receipts", "gamification"],
)
def test_a_program_whose_receipts_or_rewards_the_generator_cannot_send_or_count_is_refused(
    change: Any, said: str
) -> None:
    """Each ran: the app receipts refused by channel, every POS receipt an IndexError, yesterday's
    receipts refused as late, and rewards landing in balances after the run compared them, all
    reported as a correct ledger's mismatches (or a traceback)."""
    import yaml

    document = yaml.safe_load(LOADGEN.read_text())
    change(document)
    with pytest.raises(UnmodelledProgram, match=said):
        model(document)


async def test_a_second_run_with_the_same_seed_is_refused_naming_the_seed(
    plain_mesh: tuple[LedgerUnderTest, RulesUnderTest],
) -> None:
    """Its members and receipts are the first run's (the same keys), answered as replays: the books
    did not grow, and the run reported a correct ledger as not exact."""
    ledger, rules = plain_mesh
    assert (await _run(ledger, rules, seed=8)).ok
    with pytest.raises(ValueError, match="--seed 8 was run on this ledger before"):
        await _run(ledger, rules, seed=8)
    # Its first member bought nothing (3 purchases among 40 Zipf-drawn members): it still ran.
    once = await run(ledger.address, rules.address, "loadgen", purchases=3, members=40, seed=5, concurrency=1)
    assert once.ok
    with pytest.raises(ValueError, match="--seed 5 was run on this ledger before"):
        await run(ledger.address, rules.address, "loadgen", purchases=3, members=40, seed=5, concurrency=1)
