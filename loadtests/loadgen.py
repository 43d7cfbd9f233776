"""`pointmesh loadgen`: many purchases through the full accrual path, then proof that every
member's points are exactly what the program says, computed here and not read back.

The purchases are generated from a seed (members drawn Zipf-hot, 1-3 lines, receipt times
over yesterday's UTC day at the hours tills and web shops are busy), streamed to ledger_svc's
IngestBatch a few thousand at a time (each ledger chunk makes one EvaluateBatch call to
rules_svc and one ScoreBatch call to fraud_svc when screening is configured; `--unary` sends
RecordPurchase one by one instead, for comparison), and the expected points per member come from the program's base rates, floored per line, the rounding the program
declares. The program must be one the generator can model on its own: base rates and FLOOR
rounding, no rules, tiers, FX, welcome bonuses or gamification rewards, taking the pos, web and
app receipts it sends, for listed stores, up to two days late (`loadtests/programs/loadgen.yaml`
is one); anything else is refused up front. A seed runs once on a ledger: its members and
receipts are named by it, so a second run would be answered with the first one's replays. Every purchase sent must be answered exactly once (the
stream's `received` count and one purchase or failure per index). A purchase may be REFUSED
only under a fraud DENY verdict, and then earns nothing; one held for review (REVIEW) earns
pending points, the rest posted points, so each member's posted and pending balances must each
equal its own expectation, and so must the growth of the ledger's member and pending totals.
Then the ledger's own reconciliation must report zero differences.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import TypeVar

import grpc

from fraud_svc.synth import POS_HOURS, WEB_HOURS
from pointmesh.clients import ledger_stub, rules_stub
from pointmesh.timestamps import to_timestamp
from pointmesh.v1 import common_pb2, ledger_pb2, rules_pb2

T = TypeVar("T")
CATEGORIES = ("apparel", "outdoor", "footwear", "misc")
CHANNELS, CHANNEL_WEIGHTS = ("pos", "web", "app"), (70, 20, 10)
LATEST_DAYS = 2  # the generated day's receipts are up to two days old when they arrive
PAGE = 500  # purchases per IngestBatch stream message
# How long purchases answered "waiting for the points engine" may take to earn (the ledger
# retries them every maintenance interval) before the run counts them as a mismatch.
WAITING_SECONDS = 120.0


class UnmodelledProgram(ValueError):
    """The program has rules the generator cannot compute by itself."""


@dataclass(frozen=True, slots=True)
class Rates:
    """unit -> (points, per_minor) for one currency."""

    currency: str
    per_unit: dict[str, tuple[int, int]]

    def points(self, line_amounts: list[int]) -> dict[str, int]:
        return {unit: sum(a * p // per for a in line_amounts) for unit, (p, per) in self.per_unit.items()}


@dataclass(slots=True)
class Report:
    purchases: int = 0
    members: int = 0
    refused: int = 0
    held: int = 0
    unscored: int = 0  # screened purchases whose verdict came from the unavailable policy
    waited: int = 0  # answered "waiting for the points engine" (rules_svc slow): settled later
    elapsed_seconds: float = 0.0
    mismatches: list[str] = field(default_factory=list)
    reconcile_differences: int = 0

    @property
    def ok(self) -> bool:
        return not self.mismatches and self.reconcile_differences == 0

    @property
    def rate(self) -> float:
        return self.purchases / self.elapsed_seconds if self.elapsed_seconds else 0.0


def model(document: dict[str, object], currency: str = "EUR") -> Rates:
    """The base rates of a program that has nothing else that changes points."""
    for name in ("rules", "groups", "tiers", "fx"):
        if document.get(name):
            raise UnmodelledProgram(f"the program has {name}; loadgen models base rates only")
    game = document.get("gamification") or {}
    if isinstance(game, dict) and any(game.get(kind) for kind in ("achievements", "streaks", "challenges")):
        # their rewards reach balances later, through rules_svc's worker: not this run's to count
        raise UnmodelledProgram("the program has gamification; loadgen models base rates only")
    taken = document.get("channels") or []
    if missing := [ch for ch in CHANNELS if ch not in taken]:  # type: ignore[operator]
        raise UnmodelledProgram(
            f"the program takes no {', '.join(missing)} receipts; loadgen sends {', '.join(CHANNELS)}"
        )
    if not document.get("stores"):
        raise UnmodelledProgram("the program lists no stores for the POS receipts loadgen sends")
    policy = document.get("policy") or {}
    if isinstance(policy, dict) and int(policy.get("max_lateness_days", LATEST_DAYS)) < LATEST_DAYS:
        raise UnmodelledProgram(f"the program refuses receipts {LATEST_DAYS} days late; loadgen sends the last day's")
    if isinstance(policy, dict) and policy.get("rounding", "floor") != "floor":
        raise UnmodelledProgram("loadgen models FLOOR rounding only")
    if isinstance(policy, dict) and policy.get("release_after_days", 0):
        raise UnmodelledProgram("loadgen models points posted at once (no release_after_days)")
    rates = {str(r["unit"]): (int(r["points"]), int(r["per_minor"]))
             for r in document.get("base_rates", []) if r["currency"] == currency}  # type: ignore[attr-defined,index]  # fmt: skip
    if not rates:
        raise UnmodelledProgram(f"the program earns nothing in {currency}")
    return Rates(currency, rates)


MAX_PER_MEMBER = 12  # purchases one member makes in the generated day, hot or not


def _enough(members: int, purchases: int) -> None:
    if purchases > members * MAX_PER_MEMBER:
        raise ValueError(f"{purchases} purchases need at least {-(-purchases // MAX_PER_MEMBER)} members")


def generate(
    seed: int, members: list[str], count: int, now: datetime, stores: Sequence[str]
) -> list[ledger_pb2.RecordPurchaseRequest]:
    """A day of purchases in receipt-time order: members drawn Zipf-hot (s=1.1) but none past
    MAX_PER_MEMBER (a shopper, not a fraud burst), 70% at a store's POS, the rest web and app.

    Receipts fall on the UTC day before `now`, each at an hour drawn from the opening-hour
    profile of its channel, the profiles fraud_svc's model is trained on. The model reads the
    hour of day: a day spread evenly from the wall clock put a third of the tills' receipts in
    the small hours, and the share held for review swung from 0.05% to 17% with the hour the
    run started."""
    _enough(len(members), count)
    rng = random.Random(seed)
    weights = list(itertools.accumulate(1 / (k**1.1) for k in range(1, len(members) + 1)))
    made = [0] * len(members)
    day = now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(days=1)
    hours = {"pos": list(itertools.accumulate(POS_HOURS)), "web": list(itertools.accumulate(WEB_HOURS))}
    drawn = []
    for _ in range(count):
        who = rng.choices(range(len(members)), cum_weights=weights)[0]
        while made[who] >= MAX_PER_MEMBER:
            who = rng.randrange(len(members))
        made[who] += 1
        channel = rng.choices(CHANNELS, weights=CHANNEL_WEIGHTS)[0]
        hour = rng.choices(range(24), cum_weights=hours["pos" if channel == "pos" else "web"])[0]
        at = day + timedelta(hours=hour, milliseconds=rng.randrange(3_600_000))
        drawn.append((at, who, channel, [rng.randint(100, 20_000) for _ in range(rng.randint(1, 3))]))
    drawn.sort(key=lambda d: d[0])
    return [
        ledger_pb2.RecordPurchaseRequest(
            member_id=members[who], channel=channel, store_id=rng.choice(stores) if channel == "pos" else "",
            receipt_id=f"lg-{seed}-{i}", total=common_pb2.Money(amount_minor=sum(amounts), currency="EUR"),
            lines=[ledger_pb2.PurchaseLine(sku=f"sku-{rng.randint(1, 999)}", category=rng.choice(CATEGORIES),
                                           quantity=1, amount=common_pb2.Money(amount_minor=a, currency="EUR"))
                   for a in amounts],
            receipt_time=to_timestamp(at),
        )
        for i, (at, who, channel, amounts) in enumerate(drawn)
    ]  # fmt: skip


def _pages(chunk: Sequence[ledger_pb2.RecordPurchaseRequest]) -> list[ledger_pb2.IngestBatchRequest]:
    """A stream's purchases as pages: one gRPC message per item costs the ledger more than the item."""
    return [
        ledger_pb2.IngestBatchRequest(page=ledger_pb2.IngestPage(
            items=[ledger_pb2.IngestBatchRequest(purchase=r) for r in chunk[first:first + PAGE]]))
        for first in range(0, len(chunk), PAGE)
    ]  # fmt: skip


async def run(ledger_addr: str, rules_addr: str, program: str, *, purchases: int, members: int, seed: int,
              concurrency: int = 4, batch: int = 2_000, unary: bool = False) -> Report:  # fmt: skip
    """Batch mode (the default): `concurrency` IngestBatch streams of `batch` purchases at a
    time, so each ledger chunk makes one EvaluateBatch and one ScoreBatch call. Unary mode:
    `concurrency` callers of RecordPurchase, for comparison."""
    rules, ledger = (
        rules_stub(rules_addr, default_timeout_seconds=10),
        ledger_stub(ledger_addr, default_timeout_seconds=120),
    )
    doc = json.loads((await rules.GetProgram(rules_pb2.GetProgramRequest(program=program))).document_json)
    rates = model(doc)
    _enough(members, purchases)
    report = Report(purchases=purchases, members=members)
    totals = await ledger.GetTotals(ledger_pb2.GetTotalsRequest(fresh=True))
    before, creating = _liability(totals, rates), totals.as_of.ToDatetime(tzinfo=UTC)  # by the ledger's clock
    ids = await _bounded(
        [partial(ledger.CreateMember, ledger_pb2.CreateMemberRequest(
            idempotency_key=common_pb2.IdempotencyKey(namespace="loadgen", key=f"{seed}-m{i}")))
         for i in range(members)],
        64,
    )  # fmt: skip
    member_ids = [r.member.member_id for r in ids]
    # Members created before this run are an earlier run's (their keys name the seed), and so are
    # its receipts: they would answer as replays, and the books not grow.
    if min(r.member.created_at.ToDatetime(tzinfo=UTC) for r in ids) < creating:
        raise ValueError(f"--seed {seed} was run on this ledger before; use another seed")
    stores = [str(store["id"]) for store in doc.get("stores", [])]  # type: ignore[attr-defined,index]
    items = generate(seed, member_ids, purchases, datetime.now(UTC), stores)
    # Posted (spendable) and pending (held for review) points, kept apart: a review credited as
    # spendable, or an allowed purchase left pending, would be invisible in their sum.
    posted: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    pending: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))

    waiting: list[tuple[ledger_pb2.RecordPurchaseRequest, str]] = []

    def settle(
        request: ledger_pb2.RecordPurchaseRequest,
        purchase_id: str,
        status: ledger_pb2.PurchaseStatus.ValueType,
        verdict: ledger_pb2.ScreeningVerdict.ValueType,
        scored: bool,
    ) -> None:
        if status == ledger_pb2.PURCHASE_STATUS_PENDING_ACCRUAL:
            # Accepted, and earns once rules_svc answers (the ledger retries it): settled then.
            report.waited += 1
            waiting.append((request, purchase_id))
            return
        if verdict != ledger_pb2.SCREENING_VERDICT_UNSPECIFIED and not scored:
            report.unscored += 1
        denied = verdict == ledger_pb2.SCREENING_VERDICT_DENY
        if status == ledger_pb2.PURCHASE_STATUS_REFUSED:
            report.refused += 1
            if not denied:  # the program refuses nothing: only fraud screening's DENY may
                report.mismatches.append(f"purchase {request.receipt_id} refused without a fraud DENY verdict "
                                         f"(verdict {ledger_pb2.ScreeningVerdict.Name(verdict)})")  # fmt: skip
            return
        if denied:
            report.mismatches.append(f"purchase {request.receipt_id} denied by fraud screening but "
                                     f"{ledger_pb2.PurchaseStatus.Name(status)}, not refused")  # fmt: skip
            return
        into = posted
        if verdict == ledger_pb2.SCREENING_VERDICT_REVIEW:
            report.held += 1
            into = pending
        for unit, points in rates.points([ln.amount.amount_minor for ln in request.lines]).items():
            into[request.member_id][unit] += points

    async def one_by_one(queue: Iterator[ledger_pb2.RecordPurchaseRequest]) -> None:
        for request in queue:
            got = (await ledger.RecordPurchase(request)).purchase
            settle(request, got.purchase_id, got.status, got.screening.verdict, got.screening.scored)

    async def streams(queue: Iterator[list[ledger_pb2.RecordPurchaseRequest]]) -> None:
        for chunk in queue:
            response = await ledger.IngestBatch(iter(_pages(chunk)))
            answered = _Answers(chunk, report.mismatches)
            if response.received != len(chunk):
                report.mismatches.append(f"IngestBatch from {chunk[0].receipt_id}: sent {len(chunk)} purchases, "
                                         f"the ledger received {response.received}")  # fmt: skip
            for failure in response.failures:
                if answered.first(failure.index):
                    report.mismatches.append(f"purchase {chunk[failure.index].receipt_id} failed: {failure.code} "
                                             f"{failure.field}: {failure.message}")  # fmt: skip
            for done in response.purchases:
                if answered.first(done.index):
                    settle(chunk[done.index], done.purchase_id, done.status, done.verdict, done.scored)
            answered.check_all()

    started = time.perf_counter()
    if unary:
        queue = iter(items)
        await asyncio.gather(*(one_by_one(queue) for _ in range(concurrency)))
    else:
        chunks = iter([items[k : k + batch] for k in range(0, len(items), batch)])
        await asyncio.gather(*(streams(chunks) for _ in range(concurrency)))
    report.elapsed_seconds = time.perf_counter() - started
    deadline = time.monotonic() + WAITING_SECONDS
    while waiting and time.monotonic() < deadline:
        looked = await _bounded([partial(ledger.GetPurchase, ledger_pb2.GetPurchaseRequest(purchase_id=pid))
                                 for _, pid in waiting], 64)  # fmt: skip
        still = []
        for (request, pid), got in zip(waiting, (r.purchase for r in looked), strict=True):
            if got.status == ledger_pb2.PURCHASE_STATUS_PENDING_ACCRUAL:
                still.append((request, pid))
            else:
                settle(request, pid, got.status, got.screening.verdict, got.screening.scored)
        waiting = still
        if waiting:
            await asyncio.sleep(1.0)
    if waiting:
        report.mismatches.append(f"{len(waiting)} purchases still waiting for the points engine after "
                                 f"{WAITING_SECONDS:.0f} s: {', '.join(r.receipt_id for r, _ in waiting[:5])}")  # fmt: skip
    balances = await _bounded(
        [
            partial(ledger.GetBalance, ledger_pb2.GetBalanceRequest(member_id=m, unit=u))
            for m in member_ids
            for u in rates.per_unit  # every member, those who should have nothing too
        ],
        64,
    )
    for got in (b.balance for b in balances):
        want, held = posted[got.member_id][got.unit], pending[got.member_id][got.unit]
        if (got.balance_points, got.available_points, got.pending_points) != (want, want, held):
            report.mismatches.append(f"{got.member_id} {got.unit}: expected {want} posted (spendable) and {held} "
                                     f"pending, ledger has {got.balance_points} posted ({got.available_points} "
                                     f"spendable) and {got.pending_points} pending")  # fmt: skip
    totals = await ledger.GetTotals(ledger_pb2.GetTotalsRequest(fresh=True))
    report.reconcile_differences = totals.differences
    after = _liability(totals, rates)
    for unit in rates.per_unit:
        for kind, expected in (("posted", posted), ("pending", pending)):
            want = sum(per_unit.get(unit, 0) for per_unit in expected.values())
            grew = after[kind][unit] - before[kind][unit]
            if grew != want:  # nothing lost or doubled in the books as a whole either (on a ledger nobody else uses)
                report.mismatches.append(
                    f"all members {unit}: expected {want} more {kind}, the ledger's totals grew by {grew}"
                )
    return report


class _Answers:
    """Which purchases of one IngestBatch stream the response answered: each index exactly
    once, in purchases or failures. A purchase the ledger drops without a word would otherwise
    just be missing from both the expectation and the books."""

    def __init__(self, chunk: Sequence[ledger_pb2.RecordPurchaseRequest], mismatches: list[str]) -> None:
        self.chunk, self.mismatches = chunk, mismatches
        self.seen = bytearray(len(chunk))

    def first(self, index: int) -> bool:
        """True the first time `index` is answered; a mismatch when it is out of range or again."""
        if not 0 <= index < len(self.chunk):
            self.mismatches.append(f"IngestBatch from {self.chunk[0].receipt_id}: an answer for item {index} "
                                   f"of a stream of {len(self.chunk)}")  # fmt: skip
            return False
        if self.seen[index]:
            self.mismatches.append(f"purchase {self.chunk[index].receipt_id} answered twice")
            return False
        self.seen[index] = 1
        return True

    def check_all(self) -> None:
        if self.seen.count(0):
            missing = [self.chunk[i].receipt_id for i, n in enumerate(self.seen) if not n]
            shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
            self.mismatches.append(
                f"{len(missing)} purchases with no answer (in neither purchases nor failures): {shown}"
            )


def _liability(totals: ledger_pb2.GetTotalsResponse, rates: Rates) -> dict[str, dict[str, int]]:
    """Points members hold per unit: "posted" and "pending"."""
    books = {t.account_class: t.points for t in totals.totals}
    return {
        kind: {unit: books.get(f"{account}:{unit}", 0) for unit in rates.per_unit}
        for kind, account in (("posted", "member"), ("pending", "pending"))
    }


async def _bounded(calls: list[Callable[[], Awaitable[T]]], limit: int) -> list[T]:
    """Makes the calls with at most `limit` in flight (a gRPC call starts when it is made, so
    each is made only when admitted), results in order."""
    gate = asyncio.Semaphore(limit)

    async def one(call: Callable[[], Awaitable[T]]) -> T:
        async with gate:
            return await call()

    return await asyncio.gather(*(one(c) for c in calls))


def main(ledger_addr: str, rules_addr: str, program: str, purchases: int, members: int, seed: int,
         concurrency: int, batch: int, unary: bool) -> int:  # fmt: skip
    try:
        report = asyncio.run(run(ledger_addr, rules_addr, program, purchases=purchases, members=members, seed=seed,
                                 concurrency=concurrency, batch=batch, unary=unary))  # fmt: skip
    except UnmodelledProgram as exc:
        print(f"loadgen: program {program}: {exc}")
        return 2
    except ValueError as exc:
        print(f"loadgen: {exc}")
        return 2
    except grpc.RpcError as exc:
        print(f"loadgen: {exc.code().name}: {exc.details()}")  # type: ignore[attr-defined]
        return 75
    how = "unary RecordPurchase" if unary else f"IngestBatch streams of {batch}"
    print(f"loadgen: {report.purchases} purchases for {report.members} members ({how}, {concurrency} at a time) "
          f"in {report.elapsed_seconds:.1f}s"
          f" ({report.rate:.0f} purchases/s); {report.refused} refused by fraud screening, {report.held} held for review,"
          f" {report.unscored} decided without a score, {report.waited} waited for the points engine")  # fmt: skip
    for line in report.mismatches[:20]:
        print("MISMATCH", line)
    print(f"loadgen: {len(report.mismatches)} balance mismatches, {report.reconcile_differences} reconciliation differences"
          + (" - exact" if report.ok else ""))  # fmt: skip
    return 0 if report.ok else 1
