"""Drives gamification from the ledger's event stream and pays rewards through the ledger.

Consumer group `rules-gamification` on the ledger events topic, each member's events in order.
A purchase event is counted once (game_store.py records its id with the progress); a reward
earned is stored as PENDING in the same transaction, then posted as an Earn whose idempotency
key is the reward's deterministic key. A worker killed between the two, an event delivered
twice, a ledger briefly down: the reward stays PENDING until the ledger says it is posted, and
the ledger posts one key once (a key past the ledger's 128 characters goes as its digest).

A purchase taken back (a full return, or its fraud review rejected) takes back the progress it
gave; an award it no longer earns is REVOKE until the ledger has reversed its Earn (under the
reward's key in namespace `gamification-revoke`, so once). Whether a revoked award was ever posted is asked of the
ledger by posting its key again: that answers the transaction if it was (an Earn that timed out
may still have landed), and if it was not posts it, so that the reversal nets it out; either
way the member ends with the points the purchases they kept earn. Returning to buy points,
finishing a challenge and returning the goods keeps nothing.

A member merged into another (`members_merged`, announced on both members once per unit) is one
person from then on, as in the ledger: its progress joins the other's, once (game_store.py
keeps the merge, keyed by the member merged away), and whatever of it comes later (a purchase
handled after the merge, a return of a purchase it made) counts for the member it went to.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

import grpc
from google.protobuf.message import DecodeError
from prometheus_client import Counter

from pointmesh.bounds import within_key_length
from pointmesh.consumers import Poison, by_key, run_group
from pointmesh.errors import error_reason
from pointmesh.events import GAMIFICATION_FUNDING, LEDGER_EVENTS, BusMessage, EventBus
from pointmesh.v1 import common_pb2, ledger_pb2, ledger_pb2_grpc
from rules_svc.domain import FailedPrecondition, NotFound
from rules_svc.game_engine import ProgramHistory, PurchaseFact, is_final
from rules_svc.game_service import ProgramVersions
from rules_svc.game_store import Forgotten, GameStore, PastRetention, Reward
from rules_svc.program import Program

log = logging.getLogger(__name__)
COUNTED = Counter("pointmesh_game_purchases_counted_total", "Purchase events gamification counted (once each).")
DUPLICATES = Counter("pointmesh_game_events_redelivered_total", "Purchase events delivered again and ignored.")
COMPLETIONS = Counter("pointmesh_game_completions_total", "Achievements, streaks and challenges completed.", ["item"])
REWARD_POINTS = Counter("pointmesh_game_reward_points_paid_total", "Reward points the ledger posted.", ["unit"])
WITHDRAWN = Counter("pointmesh_game_purchases_withdrawn_total", "Counted purchases taken back (returns, rejections).")
REVOKED_POINTS = Counter("pointmesh_game_reward_points_revoked_total", "Reward points taken back by the ledger.",
                         ["unit"])  # fmt: skip
FINAL = Counter("pointmesh_game_withdrawals_final_total",
                "Purchases taken back after final_after_days: their progress stays.")  # fmt: skip
PAST_RETENTION = Counter("pointmesh_game_events_past_retention_total",
                         "Events older than what retention forgot, not handled (they may have been).")  # fmt: skip
FORGOTTEN = Counter("pointmesh_game_rows_forgotten_total", "Rows retention deleted.", ["table"])
MERGES = Counter("pointmesh_game_merges_total", "Member merges whose progress was joined (once each).")
EXPERIMENT_PURCHASES = Counter("pointmesh_experiment_purchases_total", "Purchases by experiment arm.",
                               ["experiment", "arm"])  # fmt: skip
EXPERIMENT_POINTS = Counter("pointmesh_experiment_points_total", "Points purchases earned, by experiment arm.",
                            ["experiment", "arm"])  # fmt: skip
GROUP = "rules-gamification"
REWARD_NAMESPACE = "gamification"
REVOKE_NAMESPACE = "gamification-revoke"  # the reversal of a revoked reward, under the reward's key
MERGE_HOPS = 16  # merges followed to find where a merged-away member's points went
REWARD_FUNDING = GAMIFICATION_FUNDING
RETRY_SECONDS = 2.0
FORGET_SECONDS = 3600.0  # between retention passes (the first runs at start)
LINGER_SECONDS = 0.1  # progress may trail a purchase by this much; polls stay few under load
PAGE = 500  # pending rewards read at a time
# The member is gone or can never earn: the reward is kept (status says why), not retried.
FINAL_REFUSALS = frozenset({grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT,
                            grpc.StatusCode.ALREADY_EXISTS})  # fmt: skip
# The ledger (or the way to it) is away: stop this pass, every other reward would fail the same.
# Any other refusal (a blocked member, say) concerns that reward alone: it stays pending and
# the pass goes on to the others.
OUTAGES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED,
                     grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL})  # fmt: skip


# Event types gamification reads ("": unnamed): purchases, what can take one back, and merges.
COUNTED_KINDS = frozenset({"purchase_recorded", "purchase_returned", "review_decided", "members_merged", ""})
# The program version in effect at a time. GameService.program_at (a ProgramVersions) also tells
# what all versions say; a bare function leaves the version in effect at each receipt to decide
# alone (game_engine.apply).
ProgramAt = Callable[[str, datetime], Program]


def withdrawn_purchase(event: ledger_pb2.LedgerEvent) -> str:
    """The purchase the event takes back, if it does: a full return, or the rejection of the
    fraud review its points were held for ('' otherwise; a partial return leaves a purchase)."""
    kind = event.WhichOneof("payload")
    if kind == "purchase_returned" and event.purchase_returned.fully_returned:
        return event.purchase_returned.purchase_id
    if kind == "review_decided":
        r = event.review_decided
        if r.kind == ledger_pb2.REVIEW_KIND_EARN and r.status == ledger_pb2.REVIEW_STATUS_REJECTED:
            return r.purchase_id
    return ""


class ErasedMember(Exception):
    """The reward's member was erased (and not merged into anyone): it can never be paid."""


def purchase_fact(event: ledger_pb2.LedgerEvent) -> PurchaseFact | None:
    if event.WhichOneof("payload") != "purchase_recorded":
        return None
    p = event.purchase_recorded
    return PurchaseFact(
        event_id=event.event_id, member_id=event.member_id, purchase_id=p.purchase_id, channel=p.channel,
        store_id=p.store_id, total_minor=p.total.amount_minor, currency=p.total.currency,
        receipt_time=p.receipt_time.ToDatetime(tzinfo=UTC),
        categories=tuple(p.categories), earned=tuple(sorted(p.earned.items())),
        experiment_arms=tuple(sorted(p.experiment_arms.items())),
    )  # fmt: skip


class GameWorker:
    def __init__(self, store: GameStore, program_at: ProgramAt, program: str, bus: EventBus,
                 ledger: ledger_pb2_grpc.LedgerServiceStub, consumer: str, *,
                 retention: timedelta | None = None) -> None:  # fmt: skip
        """`retention`: how long event ids are kept (the ledger's key retention; None keeps
        everything, for a handler driven alone)."""
        self.store = store
        self.program_at = program_at
        self.program = program
        self.bus = bus
        self.ledger = ledger
        self.consumer = consumer
        self.retention = retention

    async def run(self, stop: asyncio.Event) -> None:
        per_member = by_key(self.bus, LEDGER_EVENTS, GROUP, self.handle)

        async def purchases(messages: list[BusMessage]) -> None:
            # Most of the ledger's events are not purchases (earns, tiers, holds...); the
            # relay names each one's kind, so those are passed over unread. A message that
            # names none is read, and dead-lettered if it is not an event.
            await per_member([m for m in messages if m.event_type in COUNTED_KINDS])

        await asyncio.gather(
            run_group(self.bus, LEDGER_EVENTS, GROUP, self.consumer, purchases, stop=stop, linger_s=LINGER_SECONDS),
            _every(stop, RETRY_SECONDS, self._pay_and_revoke, "paying pending rewards"),
            *([_every(stop, FORGET_SECONDS, self.forget, "gamification retention pass")] if self.retention else []),
        )

    async def handle(self, message: BusMessage) -> None:
        try:
            event = ledger_pb2.LedgerEvent.FromString(message.payload)
        except DecodeError as exc:
            raise Poison(f"not a LedgerEvent: {exc}") from exc
        fact = purchase_fact(event)
        occurred_at = event.occurred_at.ToDatetime(tzinfo=UTC) if event.HasField("occurred_at") else None
        try:
            if event.WhichOneof("payload") == "members_merged":
                merged = event.members_merged
                await self.merge(merged.source_member_id, merged.target_member_id, occurred_at)
                return
            if fact is None:
                purchase_id = withdrawn_purchase(event)
                if purchase_id:
                    await self.withdraw(event.event_id, event.member_id, purchase_id, occurred_at)
                return
            await self._count(fact, occurred_at)
        except PastRetention as exc:
            PAST_RETENTION.inc()
            log.warning("%s", exc)

    async def _count(self, fact: PurchaseFact, occurred_at: datetime | None) -> None:
        try:
            program = self.program_at(self.program, fact.receipt_time)
        except (NotFound, FailedPrecondition) as exc:  # no version in effect then: no retry changes that
            raise Poison(f"no program {self.program} to count purchase {fact.purchase_id} under: {exc}") from exc
        game = program.gamification
        if not (game.achievements or game.streaks or game.challenges or fact.experiment_arms):
            return  # nothing under this version counts purchases; rewards still pending retry on their own
        history = self._history()
        awards = await asyncio.to_thread(self.store.apply_event, program, fact, history, occurred_at)
        if awards is None:
            DUPLICATES.inc()
        else:
            COUNTED.inc()
            for experiment_id, arm in fact.experiment_arms:
                EXPERIMENT_PURCHASES.labels(experiment_id, arm).inc()
                EXPERIMENT_POINTS.labels(experiment_id, arm).inc(fact.points(program.units[0]))
            for award in awards:
                COMPLETIONS.labels(award.item_id).inc()
            if awards:
                log.info("member %s completed %s", fact.member_id, ", ".join(a.item_id for a in awards))
        await self.pay(fact.member_id)

    async def merge(self, source: str, target: str, at: datetime | None = None) -> None:
        """Joins the source's progress to the target's under the version in effect at the merge
        (`at`, the event's time; now when it has none), and pays what the union earns."""
        when = at or datetime.now(UTC)
        try:
            program = self.program_at(self.program, when)
        except (NotFound, FailedPrecondition) as exc:
            raise Poison(f"no program {self.program} to merge member {source} into {target} under: {exc}") from exc
        try:
            awards = await asyncio.to_thread(self.store.merge, program, source, target, self._history(), at)
        except ValueError as exc:  # a merge into a member merged into the source: the ledger refuses those
            raise Poison(str(exc)) from exc
        if awards is None:
            return  # handled already: the other member's copy, another unit's, or a redelivery
        MERGES.inc()
        for award in awards:
            COMPLETIONS.labels(award.item_id).inc()
        log.info("member %s merged into %s%s", source, target,
                 f": together they completed {', '.join(a.item_id for a in awards)}" if awards else "")  # fmt: skip
        await self.pay(target)

    async def withdraw(self, event_id: str, member_id: str, purchase_id: str, at: datetime | None = None) -> None:
        """Takes back what the purchase gave, under the version in effect when it was made,
        unless it was taken back (`at`, the event's time) after that version made it final (an
        event with no time, which the ledger never writes, is not checked)."""
        receipt = await asyncio.to_thread(self.store.counted_receipt, self.program, member_id, purchase_id)
        if receipt is None:
            return  # never counted (nothing matched, counted before per-purchase progress was kept, or final)
        try:
            program = self.program_at(self.program, receipt)
        except (NotFound, FailedPrecondition) as exc:
            raise Poison(f"no program {self.program} to withdraw purchase {purchase_id} under: {exc}") from exc
        if at is not None and is_final(program, receipt, at):
            FINAL.inc()
            log.info("purchase %s of member %s taken back %s after its receipt: its progress is final",
                     purchase_id, member_id, at - receipt)  # fmt: skip
            return
        keys = await asyncio.to_thread(self.store.withdraw_event, program, event_id, member_id, purchase_id,
                                       self._history(), at)  # fmt: skip
        if keys is None:
            DUPLICATES.inc()
            return
        WITHDRAWN.inc()
        if keys:
            log.info("purchase %s of member %s taken back: revoking %s", purchase_id, member_id, ", ".join(keys))
            await self.revoke(member_id)
        await self.pay(member_id)  # a returned week that split a paid streak pays the run it left unpaid

    async def revoke(self, member_id: str = "") -> int:
        """Has the ledger take back the points of REVOKE rewards (one member's, or all); stops at
        an outage (the retry loop comes back), leaves any other refusal for the next pass."""
        done, after = 0, ""
        while True:
            page = await asyncio.to_thread(self.store.revoking, member_id, PAGE, after)
            for reward, paid_by in page:
                try:
                    done += await self._revoke(reward, paid_by)
                except grpc.aio.AioRpcError as error:
                    log.warning("reward %s not revoked yet (%s: %s); retrying", reward.key, error.code().name,
                                error.details())  # fmt: skip
                    if error.code() in OUTAGES:
                        return done
            if len(page) < PAGE:
                return done
            after = page[-1][0].key

    async def _revoke(self, reward: Reward, paid_by: str) -> int:
        if not paid_by:
            try:
                paid_by = (await self._post(reward)).transaction.transaction_id
            except ErasedMember:  # refused only for a key not posted: nothing to take back
                return int(await asyncio.to_thread(self.store.revoked, reward.key, ""))
            except grpc.aio.AioRpcError as error:
                # The ledger will never post it, so there is nothing to take back. A member no
                # longer active (merged away, erased) is refused only for a key not posted
                # before: the ledger answers a posted key from its record first.
                if error.code() not in FINAL_REFUSALS and error_reason(error) != "MEMBER_NOT_ACTIVE":
                    raise
                return int(await asyncio.to_thread(self.store.revoked, reward.key, ""))
        try:
            response = await self.ledger.Reverse(ledger_pb2.ReverseRequest(
                idempotency_key=common_pb2.IdempotencyKey(namespace=REVOKE_NAMESPACE, key=within_key_length(reward.key)),
                transaction_id=paid_by, full=True,
                reason=f"{reward.item_id}: {reward.name}: the purchase that earned it was taken back"[:200],
            ))  # fmt: skip
            reversal, points = response.transaction.transaction_id, -response.transaction.points
        except grpc.aio.AioRpcError as error:
            if error_reason(error) != "ALREADY_REVERSED":
                raise
            reversal, points = "", 0  # taken back already (by ops, say): nothing left to take
        if not await asyncio.to_thread(self.store.revoked, reward.key, reversal):
            return 0
        REVOKED_POINTS.labels(reward.unit).inc(points)
        return 1

    def _history(self) -> ProgramHistory | None:
        if isinstance(self.program_at, ProgramVersions):
            return self.program_at.history(self.program)
        return None

    async def pay(self, member_id: str = "") -> int:
        """Posts PENDING rewards, every page of them; a ledger that cannot answer now leaves the
        rest for the retry loop. Rewards it refuses for now (a blocked member) stay pending
        without holding back the ones after them."""
        paid, after = 0, ""
        while True:
            page = await asyncio.to_thread(self.store.pending, member_id, PAGE, after)
            for reward in page:
                try:
                    response = await self._post(reward)
                except ErasedMember:
                    log.warning("reward %s not paid: its member was erased", reward.key)
                    await asyncio.to_thread(self.store.settle, reward.key, "REFUSED:ERASED")
                    continue
                except grpc.aio.AioRpcError as error:
                    if error.code() in FINAL_REFUSALS:
                        log.error("reward %s refused by the ledger: %s", reward.key, error.details())
                        await asyncio.to_thread(self.store.settle, reward.key, f"REFUSED:{error.code().name}")
                        continue
                    log.warning("reward %s not posted yet (%s: %s); retrying", reward.key, error.code().name,
                                error.details())  # fmt: skip
                    if error.code() in OUTAGES:
                        return paid
                    continue
                # The event handler and the retry loop may both pay a reward: the ledger posts
                # it once (its key), and only the payer that settles it counts it.
                if await asyncio.to_thread(self.store.settle, reward.key, "PAID", response.transaction.transaction_id):
                    REWARD_POINTS.labels(reward.unit).inc(reward.points)
                    paid += 1
            if len(page) < PAGE:
                return paid
            after = page[-1].key

    async def _post(self, reward: Reward) -> ledger_pb2.EarnResponse:
        """The reward's Earn. A member merged away since the reward was earned (erased since,
        too) gets it on the member it went to, hop by hop along the merges: the same key, so a
        key already posted on a member along the way answers from its record (the member is in
        its fingerprint: the one it was posted for conflicts elsewhere)."""
        member_id = reward.member_id
        for _ in range(MERGE_HOPS):
            try:
                response: ledger_pb2.EarnResponse = await self.ledger.Earn(self._earn(reward, member_id))
                return response
            except grpc.aio.AioRpcError as error:
                if error_reason(error) not in ("MEMBER_NOT_ACTIVE", "IDEMPOTENCY_CONFLICT"):
                    raise
                member = (await self.ledger.GetMember(ledger_pb2.GetMemberRequest(member_id=member_id))).member
                if not member.merged_into_member_id:
                    if member.status == ledger_pb2.MEMBER_STATUS_ERASED:
                        raise ErasedMember(member_id) from error
                    raise
                member_id = member.merged_into_member_id
        raise RuntimeError(f"reward {reward.key}: more than {MERGE_HOPS} merges from member {reward.member_id}")

    def _earn(self, reward: Reward, member_id: str = "") -> ledger_pb2.EarnRequest:
        return ledger_pb2.EarnRequest(
            idempotency_key=common_pb2.IdempotencyKey(namespace=REWARD_NAMESPACE, key=within_key_length(reward.key)),
            member_id=member_id or reward.member_id, unit=reward.unit, points=reward.points,
            funding_source=REWARD_FUNDING,
            reference=f"{reward.item_id}: {reward.name}"[:200],
        )  # fmt: skip

    async def forget(self) -> Forgotten:
        """One retention pass (GameStore.forget) under what every version of the program says."""
        if self.retention is None:
            raise RuntimeError("this worker keeps everything: it was given no retention")
        history = self._history() or ProgramHistory.of([self.program_at(self.program, datetime.now(UTC))])
        done = await asyncio.to_thread(self.store.forget, self.program, history, self.retention)
        for table, rows in (("game_events", done.events), ("game_counted", done.counted),
                            ("experiment_purchases", done.experiment_purchases)):  # fmt: skip
            FORGOTTEN.labels(table).inc(rows)
        if done.events or done.counted or done.experiment_purchases:
            log.info("retention forgot %d event ids, %d purchases' progress rows, %d experiment purchases",
                     done.events, done.counted, done.experiment_purchases)  # fmt: skip
        return done

    async def _pay_and_revoke(self) -> None:
        await self.pay()
        await self.revoke()


async def _every(stop: asyncio.Event, seconds: float, work: Callable[[], Awaitable[object]], what: str) -> None:
    """`work` now and every `seconds` until `stop`; a failure is logged and tried again then."""
    while not stop.is_set():
        try:
            await work()
        except Exception:
            log.exception("%s failed; retrying", what)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), seconds)
