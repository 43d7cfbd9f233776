"""Work that spans two shards, run as sagas: cross-shard transfers, member merges, and
reversals of earns whose member was merged away.

Every step is idempotent (deterministic transaction ids, saga state checked inside each
shard's unit of work), so recovery simply runs the remaining steps forward (decision 0006).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, replace
from datetime import datetime
from typing import TYPE_CHECKING, Any

from ledger_svc import codec, reviews
from ledger_svc import commands as c
from ledger_svc.domain import (
    FailedPrecondition,
    LedgerError,
    NotFound,
    ReverseResult,
    SagaState,
    TxKind,
    bucket_of,
    new_id,
    transfer_tx_ids,
)
from ledger_svc.postings import Portion, ShardBook, to_transaction
from ledger_svc.purchases import (
    MemberState,
    give_back_caps,
    keep_state,
    load_state,
    qualification_bucket_of,
    require_unmerged,
    take_in_merged_state,
    take_in_owed,
    take_off_qualification,
)  # fmt: skip
from ledger_svc.reviews import ReviewStatus, TransferResult
from ledger_svc.screening import Screening, Verdict
from ledger_svc.screening import event_id as screening_event_id
from ledger_svc.store.base import SagaRecord, ShardTx

if TYPE_CHECKING:
    from ledger_svc.service import LedgerService

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class _SagaIds:
    saga_id: str
    out_tx: str
    in_tx: str


class Sagas:
    def __init__(self, svc: LedgerService) -> None:
        self.svc = svc

    def merge_id(self, source: str) -> str:
        return first_merge_id(source)

    async def drive_merge(self, source: str, target: str, merge_id: str = "") -> dict[str, int]:
        return (await self._drive(source, target, merge_id))[0]

    async def _drive(self, source: str, target: str, merge_id: str) -> tuple[dict[str, int], str]:
        """The merge (or sweep) saga driven to its end: what it moved, and where it moved it
        (the saga's own destination once one was started; `target` when none was)."""
        merge_id = merge_id or self.merge_id(source)
        first = merge_id == self.merge_id(source)

        def move_out(book: ShardBook) -> SagaRecord | None:
            saga = book.tx.get_saga(merge_id)
            if saga is not None:
                return saga
            if first:
                _require_settled(book.tx, source)
            elif _open_reviews(book.tx, source):
                # A sweep leaves a member under review where it is: the decision settles the
                # credit or hold on the member's own accounts, then sweeps (sweep_decided).
                return None
            # The member's purchase count, caps and tier qualification go with the points (the
            # first merge of a member only: a later sweep moves points a return gave back).
            return _move_out(book, source, target, merge_id, load_state(book, source) if first else None)

        saga = await self.svc._book(self.svc.shard_of(source), move_out)
        if saga is None:
            return {}, target
        # A saga started before says where its points go: a caller naming another member (the
        # end of a chain the target joined since) must not have them credited there as well.
        target = saga.dest_member
        self.svc._fault("merge_after_move_out")
        payload: dict[str, Any] = json.loads(saga.payload_json)
        if "units" not in payload:  # a saga started before member state moved with a merge
            payload = {"units": payload, "state": None}
        moved: dict[str, dict[str, Any]] = payload["units"]
        state = codec.from_plain(MemberState, payload["state"]) if payload["state"] else None
        owed: dict[str, int] = payload.get("owed_qualification") or {}
        owed_caps: dict[str, int] = payload.get("owed_caps") or {}
        if saga.state != SagaState.DONE:

            def move_in(book: ShardBook) -> None:
                for u, m in moved.items():
                    book.move_in_all(target, u, m, source, merge_id)
                if state is not None:
                    take_in_merged_state(book, target, source, state)
                if owed or owed_caps:
                    take_in_owed(book, target, merge_id, owed, owed_caps)

            await self.svc._book(self.svc.shard_of(target), move_in)
            await self.svc._book(
                self.svc.shard_of(source), lambda b: b.tx.set_saga_state(merge_id, SagaState.DONE, b.now)
            )
        return {u: int(m["balance"]) for u, m in moved.items()}, target

    def _transfer_ids(self, saga_id: str, source: str, destination: str) -> _SagaIds:
        return _SagaIds(saga_id, *transfer_tx_ids(saga_id, source, destination))

    def same_shard_transfer(self, book: ShardBook, cmd: c.Transfer, screening: Screening | None) -> TransferResult:
        if _under_review(screening):
            return self._reserve(book, cmd, screening)
        # The destination was active when checked; a merge may have moved it out since (another
        # replica's, or one that ran while fraud_svc screened): refused as if the merge came first.
        require_unmerged(cmd.destination_member_id, load_state(book, cmd.destination_member_id),
                         "destination_member_id")  # fmt: skip
        ids = self._transfer_ids(new_id("tr", cmd.source_member_id), cmd.source_member_id, cmd.destination_member_id)
        debit, portions = book.debit_transfer(
            cmd.source_member_id, cmd.unit, cmd.points, tx_id=ids.out_tx,
            counterparty=cmd.destination_member_id, transfer_id=ids.saga_id,
        )  # fmt: skip
        credit = book.credit_transfer(
            cmd.destination_member_id, cmd.unit, portions, tx_id=ids.in_tx, kind=TxKind.TRANSFER_IN,
            counterparty=cmd.source_member_id, transfer_id=ids.saga_id,
        )  # fmt: skip
        return TransferResult(ids.saga_id, debit, credit, None, screening)

    def start_transfer(self, book: ShardBook, cmd: c.Transfer, screening: Screening | None = None) -> str:
        """Step 1 of a cross-shard transfer (or any transfer sent to review)."""
        return self._reserve(book, cmd, screening).transfer_id

    def _reserve(self, book: ShardBook, cmd: c.Transfer, screening: Screening | None) -> TransferResult:
        """Reserves the points on the source in a hold the saga owns and records the saga;
        under review, also opens the review, and the saga waits for its decision."""
        saga_id = new_id("tr", cmd.source_member_id)
        placed = book.place_hold(
            cmd.source_member_id, cmd.unit, cmd.points, timeout=self.svc.policy.hold_max_timeout,
            reference=saga_id, saga_id=saga_id, channel=cmd.context.channel, store_id=cmd.context.store_id,
        )  # fmt: skip
        # The recipient is credited with the lots the hold keeps (what falls short, none: no expiry).
        portions = [(r.points, r.expires_at) for r in placed.hold.reserves]
        if short := cmd.points - sum(p for p, _ in portions):
            portions.append((short, None))
        payload: dict[str, Any] = {
            "portions": [[p, e.isoformat() if e else None] for p, e in portions], "reason": cmd.reason,
        }  # fmt: skip
        if screening is not None:
            # A replay of the request answers with the screening the first call had.
            payload["screening"] = codec.to_plain(screening)
        if screening is not None and not screening.scored:
            # Decided without fraud_svc: it is told once the points have moved (drive_transfer).
            payload["observe"] = screening_event_id("transfer", cmd.key.namespace, cmd.key.key)
        state, result = SagaState.HELD, TransferResult(saga_id, None, None, placed.hold, screening)
        if _under_review(screening):
            assert screening is not None
            review = reviews.open_review(
                book, reviews.new_review_id(cmd.source_member_id), reviews.ReviewKind.TRANSFER, cmd.source_member_id,
                cmd.unit, cmd.points, (placed.hold.hold_id,), screening, transfer_id=saga_id,
                counterparty_member_id=cmd.destination_member_id,
            )  # fmt: skip
            payload["review_id"] = review.review_id
            state, result = SagaState.REVIEW, replace(result, screening=review.screening)
        book.tx.add_saga(SagaRecord(
            saga_id, "transfer", state, cmd.source_member_id, cmd.destination_member_id, cmd.unit,
            cmd.points, placed.hold.hold_id, json.dumps(payload), book.now, book.now,
        ))  # fmt: skip
        return result

    async def transfer_outcome(self, saga_id: str) -> TransferResult:
        """Where a transfer stands: moved (driven to the end first if it was still on its way),
        or held by its review (the hold VOIDED once the review rejected it)."""
        src_shard = self.svc.shard_of_id(saga_id)

        def read(tx: ShardTx) -> tuple[SagaRecord | None, TransferResult | None]:
            saga = tx.get_saga(saga_id)
            if saga is None or saga.state not in (SagaState.REVIEW, SagaState.CANCELLED):
                return saga, None
            body = tx.get_review(json.loads(saga.payload_json)["review_id"])
            screening = codec.loads(reviews.Review, body).screening if body is not None else None
            return saga, TransferResult(saga_id, None, None, tx.get_hold(saga.hold_id), screening)

        saga, held = await self.svc.store.read(src_shard, read)
        return held or await self.drive_transfer(saga_id, saga)

    async def drive_transfer(self, saga_id: str, saga: SagaRecord | None = None) -> TransferResult:
        """Steps 2 and 3 of a cross-shard transfer; each is idempotent, so recovery reruns them.
        `saga`: its record, when the caller has just read it."""
        src_shard = self.svc.shard_of_id(saga_id)
        saga = saga or await self.svc.store.read(src_shard, lambda tx: tx.get_saga(saga_id))
        if saga is None:
            raise NotFound(f"transfer {saga_id} does not exist", field="transfer_id")
        ids = self._transfer_ids(saga_id, saga.source_member, saga.dest_member)
        portions: list[Portion] = [
            (int(p), datetime.fromisoformat(e) if e else None) for p, e in json.loads(saga.payload_json)["portions"]
        ]
        if saga.state == SagaState.HELD:
            await self.svc._book(
                self.svc.shard_of(saga.dest_member),
                lambda b: b.credit_transfer(
                    saga.dest_member, saga.unit, portions, tx_id=ids.in_tx, kind=TxKind.TRANSFER_IN,
                    counterparty=saga.source_member, transfer_id=saga_id,
                ),
            )  # fmt: skip
            self.svc._fault("transfer_after_credit")
            # A destination merged away while the points were on their way: they follow it
            # (before the saga closes, so a crash here reruns this on recovery).
            destination = await self.svc.member(saga.dest_member, "destination_member_id")
            if destination.merged_into:
                await self.sweep_merged(saga.dest_member, destination.merged_into)

            def finish(book: ShardBook) -> None:
                current = book.tx.get_saga(saga_id)
                if current is None or current.state != SagaState.HELD:
                    return
                book.capture_hold(saga.hold_id, saga.points, kind=TxKind.TRANSFER_OUT, tx_id=ids.out_tx,
                                  portions=portions, transfer=(saga_id, saga.dest_member))  # fmt: skip
                book.tx.set_saga_state(saga_id, SagaState.DONE, book.now)

            await self.svc._book(src_shard, finish)
        debit_rec = await self.svc.store.read(src_shard, lambda tx: tx.get_transaction(ids.out_tx))
        credit_rec = await self.svc.store.read(
            self.svc.shard_of(saga.dest_member), lambda tx: tx.get_transaction(ids.in_tx)
        )
        if debit_rec is None or credit_rec is None:
            raise FailedPrecondition(f"transfer {saga_id} did not complete", field="transfer_id")
        debit = to_transaction(debit_rec)
        payload = json.loads(saga.payload_json)
        if observe := payload.get("observe"):
            # Each drive tells it the same event (id and the debit's time): counted once.
            await self.svc.observe_transfer(observe, saga.source_member, saga.dest_member, saga.points,
                                            debit.recorded_at)  # fmt: skip
        screened = payload.get("screening")
        screening = codec.from_plain(Screening, screened) if screened is not None else None
        return TransferResult(saga_id, debit, to_transaction(credit_rec), screening=screening)

    async def drive_reversal(self, saga_id: str) -> ReverseResult:
        saga = await self.svc.store.read(self.svc.shard_of_id(saga_id), lambda tx: tx.get_saga(saga_id))
        if saga is None:
            raise NotFound(f"reversal {saga_id} does not exist", field="transaction_id")
        payload = json.loads(saga.payload_json)
        tx_id = f"tx_{bucket_of(saga.dest_member):04x}{saga_id.split('_', 1)[1][4:]}-in"
        # The earn's tier-qualification month (read where the earn lives); the months moved to
        # the member the points went to, so the credits come off there, with the points.
        month = await self.svc.store.read(
            self.svc.shard_of_id(payload["original_tx"]), lambda tx: qualification_bucket_of(tx, payload["original_tx"])
        )

        def finish(b: ShardBook) -> ReverseResult:
            first_time = b.tx.get_transaction(tx_id) is None
            result = b.finish_merged_reversal(
                saga.dest_member, saga.unit, saga.points, original_tx=payload["original_tx"], tx_id=tx_id,
                reason=payload["reason"], unreversed=payload.get("unreversed", 0),  # none in sagas of before 2026-12-06
                expired=payload.get("expired", 0),  # none in sagas of before 2026-12-07
            )  # fmt: skip
            if first_time:
                take_off_qualification(b, saga.dest_member, month, result.reversed_points)
                give_back_caps(b, saga.dest_member, payload.get("caps", {}))  # none in sagas of before 2026-12-07
            return result

        result = await self.svc._book(self.svc.shard_of(saga.dest_member), finish)
        await self.svc._book(
            self.svc.shard_of_id(saga_id), lambda b: b.tx.set_saga_state(saga_id, SagaState.DONE, b.now)
        )
        # The heir merged on meanwhile: the debit (debt, if its points had gone on) follows it.
        await self._pass_on(saga.dest_member)
        return result

    async def recover(self, *, at_startup: bool = False) -> int:
        """Completes transfers and merges a crash left half-way; safe to run any time.

        Merges that died before recording their saga are only looked for at start-up, since
        finding them means reading every merged member.
        """
        completed = 0
        for shard in range(self.svc.store.shard_count):
            for saga in await self.svc.store.read(shard, lambda tx: tx.open_sagas()):
                try:
                    if saga.kind == "transfer":
                        await self.drive_transfer(saga.saga_id)
                    elif saga.kind == "reversal":
                        await self.drive_reversal(saga.saga_id)
                    else:
                        await self.complete_merge(saga.source_member, saga.dest_member, saga.saga_id)
                    completed += 1
                except LedgerError:
                    log.exception("saga %s could not be completed yet", saga.saga_id)
        if at_startup:
            completed += await self._recover_unstarted_merges()
        return completed

    async def _recover_unstarted_merges(self) -> int:
        """A merge that died after marking the source MERGED but before moving points; and
        points that reached a merged-away member afterwards and whose sweep a crash cut off."""
        merged = await self.svc.store.read_directory(lambda d: d.merged_members())
        done = 0
        for source, target in merged:
            try:
                if await self._saga(source, self.merge_id(source)) is None:
                    heir = await self.heir_of(source)
                    if not heir:  # not merged after all (the store only said so): nothing to move
                        continue
                    await self.complete_merge(source, heir)
                    done += 1
                elif await self.sweep_merged(source, target):
                    done += 1
            except LedgerError:  # a transfer still in flight, say: the next start-up retries
                log.exception("merge of %s into %s could not be completed yet", source, target)
        return done

    async def heir_of(self, source: str) -> str:
        """Where a merged-away member's points and state go: the end of its merge chain."""
        return await self.svc.merge_heir(await self.svc.member(source))

    async def _holds_points(self, member_id: str) -> bool:
        """Points, pending or debt on any unit, or tier credits or cap use owed to its heir."""

        def any_left(tx: ShardTx) -> bool:
            book = ShardBook(tx, self.svc.clock.now(), self.svc.policy)
            figures = [book.balance(member_id, unit) for unit in self.svc.policy.units]
            state = load_state(book, member_id)
            owed = bool(state.owed_qualification or state.owed_caps)
            return any(b.balance_points or b.pending_points or b.debt_points for b in figures) or owed

        return await self.svc.store.read(self.svc.shard_of(member_id), any_left)

    async def _saga(self, member_id: str, saga_id: str) -> SagaRecord | None:
        return await self.svc.store.read(self.svc.shard_of(member_id), lambda tx: tx.get_saga(saga_id))

    async def sweep_merged(self, source: str, target: str) -> dict[str, int]:
        """Moves what reached a merged-away member after its merge (points a return gave back)
        to the member it was merged into: a merge saga of its own, recovered like the first.
        Nothing to move, no saga (and an empty answer). A target merged away in turn passes
        them on: they go to the end of the chain.

        Never around what must settle on the member first: while a fraud review of it is open
        everything stays (its decision sweeps, sweep_decided), and before the merge itself has
        moved anything (it stopped short of open reviews or waiting purchases) the merge is
        completed instead, once they are settled. Either way the caller's own work stands: a
        return or a transfer already committed is not turned into an error."""
        if await self._saga(source, self.merge_id(source)) is None:  # first: it moves state and ids too
            return await self._complete_stopped_merge(source)
        if not await self._holds_points(source):
            return {}
        heir = await self.svc.merge_heir(await self.svc.member(target)) or target
        return await self.drive_merge(source, heir, new_id("mg", source))

    async def _complete_stopped_merge(self, source: str) -> dict[str, int]:
        """A merge that marked the member MERGED but moved nothing: completed with the member's
        state, to the end of its merge chain (the member it names may have been merged on since),
        if nothing is left to settle; else left for the merge sent again (or the next start-up)
        once the reviews are decided."""
        target = await self.heir_of(source)
        try:
            return await self.complete_merge(source, target)
        except FailedPrecondition as unsettled:
            log.info("merge of %s into %s waits: %s", source, target, unsettled.message)
            return {}

    async def _pass_on(self, member_id: str) -> None:
        """Points a merge step moved to a member merged away since go on to the end of its chain
        (a failure here leaves them for the next start-up's sweep: the step itself is done)."""
        member = await self.svc.member(member_id)
        if not member.merged_into:
            return
        try:
            await self.sweep_merged(member_id, member.merged_into)
        except LedgerError:
            log.exception("points moved to %s, merged into %s, could not follow it yet", member_id, member.merged_into)

    async def follow_merge(self, member_id: str, review_id: str = "") -> None:
        """After a write that left points on a member merged away since it was checked (a
        waiting purchase that earned, a review decided): they go to its heir now rather than at
        the next maintenance pass. A decision's own sweep saga (sweep_decided) is driven if it
        started; otherwise a sweep. A failure is logged: the write stands, and recovery (the
        maintenance pass, the next start-up) moves them on."""
        member = await self.svc.member(member_id)
        if not member.merged_into:
            return
        try:
            saga = await self._saga(member_id, decided_sweep_id(review_id)) if review_id else None
            if saga is not None and saga.state != SagaState.DONE:
                await self.complete_merge(saga.source_member, saga.dest_member, saga.saga_id)
            elif saga is None:
                await self.sweep_merged(member_id, member.merged_into)
        except LedgerError:
            log.exception("points left on %s, merged into %s, could not follow it yet", member_id, member.merged_into)

    async def complete_merge(self, source: str, target: str, merge_id: str = "") -> dict[str, int]:
        """The merge (or sweep) saga driven to its end, the source's external ids made aliases of
        where its points went (the saga's destination, if one was started), and what reached a
        destination merged away since passed on down its chain."""
        moved, dest = await self._drive(source, target, merge_id)
        await self.svc.store.write_directory(lambda d: d.move_external_ids_as_aliases(source, dest))
        await self._pass_on(dest)
        return moved


def first_merge_id(source: str) -> str:
    """The saga id of a member's merge (its later sweeps get ids of their own)."""
    digest = hashlib.sha256(source.encode()).hexdigest()[:24]
    return f"mg_{bucket_of(source):04x}{digest}"


def _move_out(book: ShardBook, source: str, target: str, merge_id: str, state: MemberState | None) -> SagaRecord | None:
    """Source side of a merge or a sweep: every unit into transit, and the saga that carries
    them to the target. A sweep (no member state) that finds nothing records no saga."""
    moved = {u: m for u in book.policy.units if (m := book.move_out_all(source, u, target, merge_id))}
    left = load_state(book, source) if state is None else None
    owed = left.owed_qualification if left is not None else {}
    owed_caps = left.owed_caps if left is not None else {}
    if not moved and state is None and not owed and not owed_caps:
        return None
    if state is not None:
        # Its tier is the target's from now on: nothing left here to watch.
        keep_state(book, source, state, replace(state, merged_into=target, tier_due=None))
        if not moved:  # no unit announced it: consumers (gamification progress) still hear of it
            unit = book.policy.units[0]
            book.emit("members_merged", book.balance(source, unit),
                      {"source_member_id": source, "target_member_id": target, "points": 0})  # fmt: skip
    elif left is not None and (owed or owed_caps):  # a sweep: what was given back here since goes with it
        keep_state(book, source, left, replace(left, owed_qualification={}, owed_caps={}))
    payload: dict[str, Any] = {"units": moved, "state": codec.to_plain(state) if state else None}
    if owed:
        payload["owed_qualification"] = owed
    if owed_caps:
        payload["owed_caps"] = owed_caps
    saga = SagaRecord(
        merge_id, "merge", SagaState.HELD, source, target, "", 0, "", json.dumps(payload), book.now, book.now
    )
    book.tx.add_saga(saga)
    return saga


def sweep_decided(book: ShardBook, review: reviews.Review) -> SagaRecord | None:
    """In the write that decides a review of a member whose merge had already moved it (a
    purchase in flight opened the review after the move): once none of the member's reviews is
    open, what the decision left there (a released credit, and whatever sweeps left waiting for
    it) starts for the member it was merged into, as a merge saga of its own that recovery
    completes like any other and passes on down the chain. A merge that stopped short moved
    nothing yet: that merge, sent again, moves everything (with the member's state)."""
    member_id = review.member_id
    merge = book.tx.get_saga(first_merge_id(member_id))
    if merge is None:
        return None
    others = [r for _at, r, _body in book.tx.list_reviews(ReviewStatus.OPEN.value, member_id, None, 2)]
    if [r for r in others if r != review.review_id] or any(h.saga_id for h in book.tx.placed_holds_of(member_id)):
        return None  # the last decision sweeps; a transfer in flight keeps its hold
    return _move_out(book, member_id, merge.dest_member, decided_sweep_id(review.review_id), None)


def decided_sweep_id(review_id: str) -> str:
    """The saga id of the sweep a review's decision starts (one per review: a replay finds it)."""
    return f"mg_{review_id.split('_', 1)[1]}"


def _open_reviews(tx: ShardTx, member_id: str) -> int:
    return len(tx.list_reviews(ReviewStatus.OPEN.value, member_id, None, 100))


def _require_settled(tx: ShardTx, member_id: str) -> None:
    """In the write that moves a member's points away: a purchase that passed its status check
    before the merge marked the member MERGED may have committed since the merge's own check,
    opening a review or waiting for the points engine. Its decision or late quote would land
    on a member that holds nothing any more, so the merge stops short of moving (the member
    stays MERGED: nothing more can post to it) until the caller has settled them and sends the
    merge again."""
    reviews_open = _open_reviews(tx, member_id)
    waiting = tx.member_waiting_purchases(member_id)
    if reviews_open or waiting:
        raise FailedPrecondition(
            f"member {member_id} got {reviews_open} open fraud reviews and {waiting} purchases waiting for the points "
            "engine while it was being merged; decide them (the waiting ones earn on their own), then send the merge "
            "again",
            field="source_member_id",
        )


def _under_review(screening: Screening | None) -> bool:
    return screening is not None and screening.verdict is Verdict.REVIEW
