"""Purchases in bulk (IngestBatch): RecordPurchase's path with one EvaluateBatch and one
ScoreBatch per chunk instead of a unary call to each service per purchase.

A quote depends on the member's state only through their purchase count and tier. One member
may have many purchases in a chunk, so each is quoted for the state it will meet if the ones
before it earn: the stored count plus its place among them, and the stored qualification.
The shard write checks that assumption against the state it finds, atomically like every
guard; a purchase whose assumption failed (an earlier one was refused, or crossed a tier
threshold) rolls back and takes the unary path, which quotes it afresh. So the result is the
one RecordPurchase would give purchase by purchase. A member's purchases are written in
stream order; different members' run concurrently and share the store's group commits.

Fraud screening sees each purchase with the balance it is predicted to find (the stored
available balance plus the points of the member's earlier purchases in the chunk that are not
released later), scored in event-time order in one call; a purchase that falls back to the
unary path is scored again there, after the chunk (velocity counts an event once). A member's
purchases after one that was held or refused, whose points the prediction counted, are scored
again in a second, smaller ScoreBatch.
Anything unusual for a member (a receipt already recorded with another body, purchases waiting
for rules_svc, a transport key) sends that member's remaining purchases down the unary path, in
order.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import TYPE_CHECKING

from ledger_svc import codec
from ledger_svc import commands as c
from ledger_svc.accrual import EngineFailedOnBasket, EngineUnavailable, Priced
from ledger_svc.domain import REFUSALS, FailedPrecondition, IdempotencyConflict, LedgerError
from ledger_svc.ingest import WRITE_RUN, claim_many
from ledger_svc.postings import ShardBook
from ledger_svc.purchases import MemberState, PurchaseRecord, Quote, load_state, purchase_id_for, tender_points
from ledger_svc.screening import ScreenedKind, Screening, ScreeningRequest, Verdict
from ledger_svc.store.base import IdemRecord, ShardTx

if TYPE_CHECKING:
    from ledger_svc.accrual import Accrual

Outcome = tuple[PurchaseRecord, bool] | LedgerError
# Rounds of scoring again the purchases after a held or refused one (see _screen).
RESCORE_ROUNDS = 4


@dataclass(slots=True)
class _Item:
    index: int
    cmd: c.RecordPurchase
    fp: str
    pid: str
    unary: bool = False  # takes RecordPurchase's own path
    count: int = 0  # the purchase count its quote assumes
    quote: Quote | None = None
    screening: Screening | None = None
    claimed: bool = False  # the batch claimed its natural key (given back if its write refuses)


@dataclass(frozen=True, slots=True)
class _Found:
    stored: list[IdemRecord | None]
    states: dict[str, MemberState]
    waiting: set[str]
    available: dict[str, int]


class BatchAccrual:
    def __init__(self, accrual: Accrual) -> None:
        self.accrual = accrual
        self.svc = accrual.svc

    async def run(self, items: Sequence[c.RecordPurchase | LedgerError]) -> list[Outcome]:
        """Per item (purchase, replayed) or the LedgerError it failed with."""
        results: list[Outcome | None] = [None] * len(items)
        checked, again = _first_of_each_receipt(await self._checked(items, results))
        found = await self._read(checked, results)
        plan: dict[str, list[_Item]] = defaultdict(list)
        quoted: list[_Item] = []
        unusual: set[str] = set()
        for it, stored in zip(checked, found.stored, strict=True):
            member = it.cmd.member_id
            if results[it.index] is not None:  # refused by the read (a tender that is not one)
                continue
            if stored is not None and stored.fingerprint == it.fp and it.cmd.transport_key is None:
                try:
                    results[it.index] = (await self.accrual.get_purchase(codec.loads(str, stored.result_json)), True)
                except LedgerError as error:
                    results[it.index] = error
                continue
            try:
                self.accrual.check_new(it.cmd)
            except LedgerError as error:
                results[it.index] = error
                continue
            if member in unusual or stored is not None or member in found.waiting or it.cmd.transport_key is not None:
                unusual.add(member)
                it.unary = True
            else:
                try:
                    await self.svc._require_active(member)
                except LedgerError as error:
                    results[it.index] = error
                    continue
                it.count = found.states[member].purchase_count + sum(not x.unary for x in plan[member])
                quoted.append(it)
            plan[member].append(it)
        now = self.svc.clock.now()
        await self._quote(quoted, found, now, results)
        await self._screen([it for it in quoted if it.quote is not None], found)
        await self._claim([it for it in quoted if it.quote is not None and not it.unary], now, results)
        await asyncio.gather(*(self._write(its, now, results) for its in plan.values()))
        if again:  # once the first copies have their answers
            for it, outcome in zip(again, await self.run([it.cmd for it in again]), strict=True):
                results[it.index] = outcome
        assert all(r is not None for r in results)
        return [r for r in results if r is not None]

    async def _checked(
        self, items: Sequence[c.RecordPurchase | LedgerError], results: list[Outcome | None]
    ) -> list[_Item]:
        acc = self.accrual
        await self.svc.warm_members(item.member_id for item in items if isinstance(item, c.RecordPurchase))
        out = []
        for i, item in enumerate(items):
            try:
                if isinstance(item, LedgerError):
                    raise item
                cmd = acc._check(item)
                await self.svc._require_exists(cmd.member_id)
            except LedgerError as error:
                results[i] = error
                continue
            out.append(_Item(i, cmd, c.fingerprint(cmd), purchase_id_for(cmd.member_id, acc.program, cmd.key.key)))
        return out

    async def _read(self, items: list[_Item], results: list[Outcome | None]) -> _Found:
        """One read per shard: every receipt's stored result, every member's state, waiting
        purchases and available balance. A tender that is not a redemption of the member
        refuses its purchase here, before its keys are claimed, so the receipt can come again
        corrected."""
        svc = self.svc
        unit = svc.policy.units[0]
        by_shard: dict[int, list[int]] = defaultdict(list)
        for k, it in enumerate(items):
            by_shard[svc.shard_of(it.cmd.member_id)].append(k)
        stored: list[IdemRecord | None] = [None] * len(items)
        found = _Found(stored, {}, set(), {})

        def reader(ks: list[int]) -> Callable[[ShardTx], None]:
            def read(tx: ShardTx) -> None:
                book = ShardBook(tx, svc.clock.now(), svc.policy)
                for k in ks:
                    cmd = items[k].cmd
                    stored[k] = book.tx.get_idempotency(cmd.key.namespace, cmd.key.key)
                    member = cmd.member_id
                    try:
                        tender_points(book, member, cmd.tender_transaction_id)
                    except LedgerError as error:
                        results[items[k].index] = error
                    if member in found.states:
                        continue
                    found.states[member] = load_state(book, member)
                    if book.tx.member_waiting_purchases(member):
                        found.waiting.add(member)
                    if svc.fraud is not None:
                        found.available[member] = book.balance(member, unit).available_points

            return read

        await asyncio.gather(*(svc.store.read(shard, reader(ks)) for shard, ks in by_shard.items()))
        return found

    async def _quote(self, items: list[_Item], found: _Found, now: datetime, results: list[Outcome | None]) -> None:
        """Quotes from one EvaluateBatch; without rules_svc every item takes the unary path
        (where it waits as pending accrual)."""
        acc, svc = self.accrual, self.svc
        if not items or not acc.engine_up():
            for it in items:
                it.unary = True
            return
        assert acc.engine is not None
        requests = []
        for it in items:
            member = it.cmd.member_id
            state = replace(found.states[member], purchase_count=it.count)
            requests.append((it.cmd, state, await svc.member_profile(member)))
        try:
            quotes = await acc.engine.quote_many(acc.program, requests)
        except EngineUnavailable as exc:
            acc.engine_down(f"a batch of {len(items)} purchases", exc)
            for it in items:
                it.unary = True
            return
        for it, quote in zip(items, quotes, strict=True):
            if quote is None or isinstance(quote, EngineFailedOnBasket):  # the unary path: it waits
                it.unary = True
                continue
            if isinstance(quote, LedgerError):
                results[it.index] = quote
                continue
            late = acc._late(it.cmd, quote, now)
            if late:
                results[it.index] = FailedPrecondition(late, field="receipt_time")
                continue
            it.quote = quote

    async def _screen(self, items: list[_Item], found: _Found) -> None:
        """Scores every quoted purchase in one ScoreBatch, each with the balance it is predicted
        to meet. A purchase held or refused earns nothing spendable, so the member's later ones
        were scored on too much: those are scored again, in a smaller batch, until every
        purchase was scored on the balance the verdicts before it give (velocity counts an event
        once, however often it is scored). Rarely more than two rounds; any still unsettled
        after RESCORE_ROUNDS take the unary path."""
        svc = self.svc
        if svc.fraud is None or not items:
            return
        unit = svc.policy.units[0]
        points = [sum(p.points for p in (it.quote.parts if it.quote else ()) if p.unit == unit) for it in items]
        since = {m: await svc.member_since(m) for m in dict.fromkeys(it.cmd.member_id for it in items)}
        scored_on: list[int | None] = [None] * len(items)
        for _ in range(RESCORE_ROUNDS):
            balances = _predicted_balances(items, points, found.available)
            todo = [k for k, balance in enumerate(balances) if balance != scored_on[k]]
            if not todo:
                return
            requests = [self._request(items[k], points[k], balances[k], since) for k in todo]
            for k, screening in zip(todo, await svc.fraud.screen_many(requests), strict=True):
                items[k].screening, scored_on[k] = screening, balances[k]
        for k, balance in enumerate(_predicted_balances(items, points, found.available)):
            if balance != scored_on[k]:
                items[k].unary = True  # scored again there, on the balance it meets

    @staticmethod
    def _request(it: _Item, points: int, balance: int, since: dict[str, datetime]) -> ScreeningRequest:
        cmd, quote = it.cmd, it.quote
        assert quote is not None
        return ScreeningRequest(
            event_id=it.pid, kind=ScreenedKind.PURCHASE, member_id=cmd.member_id, occurred_at=cmd.receipt_time,
            context=replace(cmd.context, channel=cmd.channel, store_id=cmd.store_id), points=points,
            amount=quote.base_total or cmd.total, balance_points=balance, member_since=since[cmd.member_id],
        )  # fmt: skip

    async def _claim(self, items: list[_Item], now: datetime, results: list[Outcome | None]) -> None:
        claims = [(it.index, it.cmd.key, "RecordPurchase", it.fp) for it in items]
        conflicts, seen = await self.svc.store.write_directory(lambda d: claim_many(d, claims, now))
        for it in items:
            it.claimed = it.index not in conflicts and it.index not in seen
            if it.index in conflicts:
                conflict = conflicts[it.index]
                earlier = None
                if isinstance(conflict, IdempotencyConflict):
                    earlier = await self.accrual.replay_of_merged(it.cmd, conflict)
                results[it.index] = conflict if earlier is None else (earlier, True)
                it.quote = None

    async def _write(self, items: list[_Item], now: datetime, results: list[Outcome | None]) -> None:
        """One member's purchases, in stream order: runs of quoted ones in one shard write
        each (at most WRITE_RUN), the others one by one down the unary path."""
        acc = self.accrual
        todo = [it for it in items if results[it.index] is None]
        while todo:
            run: list[_Item] = []
            for it in todo[:WRITE_RUN]:
                if it.unary or it.quote is None:
                    break
                run.append(it)
            if run:
                try:
                    written = await acc.write_many(
                        [Priced(it.cmd, it.fp, it.pid, it.quote, it.screening, it.count) for it in run], now
                    )
                except LedgerError:
                    # One of them cannot post (say a bad tender): each finds its own answer alone.
                    for it in run:
                        it.unary = True
                    continue
                if len(written) > len(run):
                    raise AssertionError(f"{len(written)} results for a run of {len(run)} purchases")
                for it, outcome in zip(run[: len(written)], written, strict=True):
                    results[it.index] = outcome
                todo = todo[len(written) :]
                if len(written) == len(run):
                    continue
            it = todo.pop(0)  # unary, or its quote was stale: quoted afresh on the state it meets
            try:
                results[it.index] = await acc.record_purchase(it.cmd)
            except LedgerError as error:
                results[it.index] = error
                if isinstance(error, REFUSALS) and it.claimed:  # nothing written: the receipt may come again
                    await self.svc.release_claims([(it.cmd.key, it.fp)])


def _first_of_each_receipt(items: list[_Item]) -> tuple[list[_Item], list[_Item]]:
    """The first copy of each receipt (natural key) or request (transport key) in the stream,
    and what waits for its answer: the later copies, and their member's purchases after them.
    Those go in a batch of their own after this one, so whichever member's copy came first
    decides, as it would purchase by purchase (the batch claims quoted receipts before it, so in
    one pass a later copy could win); a first copy refused (a tender that is not one, too late)
    leaves its place to the corrected copy, whose member's later purchases still come after it."""
    first: list[_Item] = []
    again: list[_Item] = []
    seen: set[tuple[str, str, str]] = set()
    waiting: set[str] = set()  # members with a copy waiting
    for it in items:
        # A transport key names one request too: a till that sent two receipts under one key
        # gets the second refused as a conflict, whichever member it is for, as one by one.
        transport = it.cmd.transport_key
        keys = {("natural", it.cmd.key.namespace, it.cmd.key.key)}
        if transport is not None:
            keys.add(("transport", transport.namespace, transport.key))
        if keys & seen or it.cmd.member_id in waiting:
            again.append(it)
            waiting.add(it.cmd.member_id)
        else:
            first.append(it)
        seen |= keys
    return first, again


def _predicted_balances(items: Sequence[_Item], points: Sequence[int], stored: dict[str, int]) -> list[int]:
    """The available balance each purchase meets: the stored one plus the points of the
    member's earlier purchases in the chunk that become spendable at once (allowed, or not
    scored yet, and not released later)."""
    available = dict(stored)
    out = []
    for it, earned in zip(items, points, strict=True):
        member = it.cmd.member_id
        out.append(available[member])
        allowed = it.screening is None or it.screening.verdict is Verdict.ALLOW
        if allowed and it.quote is not None and it.quote.release_at is None:
            available[member] += earned
    return out
