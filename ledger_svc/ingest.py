"""Batch ingest (IngestBatch): many postings, one directory claim pass, group commits per shard.

Each item keeps the unary path's guarantees: its own idempotency key, replay before status
checks, and a failure that is reported by index without stopping the others.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from ledger_svc import commands as c
from ledger_svc.domain import (
    REFUSALS,
    EarnResult,
    IdemKey,
    IdempotencyConflict,
    LedgerError,
    ReverseResult,
    Transaction,
)
from ledger_svc.postings import ShardBook
from ledger_svc.reviews import RedeemResult, redeem_or_hold
from ledger_svc.store.base import DirectoryTx, ShardTx

if TYPE_CHECKING:
    from ledger_svc.service import LedgerService

# Items of one member in one write unit where the store commits per member (Cassandra): a
# conditional batch stays well under Cassandra's batch size limit.
WRITE_RUN = 8


class BatchIngest:
    def __init__(self, service: LedgerService, owners: dict[str, ReversalOwner] | None = None) -> None:
        self.service = service
        self.owners = owners or {}  # a reversal's transaction id -> whose earn, whose points

    async def run(self, items: Sequence[c.PostingCommand | LedgerError]) -> list[Any]:
        """Per item either (result, replayed) or the LedgerError it failed with."""
        svc = self.service
        results: list[Any] = [None] * len(items)
        prepared: list[_Prepared] = []
        for i, item in enumerate(items):
            if isinstance(item, LedgerError):
                results[i] = item
                continue
            try:
                prepared.append(await self._prepare(i, item))
            except LedgerError as exc:
                results[i] = exc
        prepared, later = _deferred(prepared)
        claims = [(p.index, p.command.key, type(p.command).__name__, p.fingerprint) for p in prepared]
        now = svc.clock.now()
        conflicts, seen = await svc.store.write_directory(lambda d: claim_many(d, claims, now))
        for i, error in conflicts.items():
            results[i] = error
        live = [p for p in prepared if p.index not in conflicts]
        # An item claimed before (a resent stream) or run by its own use case goes one at a
        # time, and with it every item of its member, in stream order: a member's redemption
        # must not be written before the earn ahead of it that this run writes for the first time.
        one_by_one = {p.lane for p in live if (p.via is not None or p.index in seen) and p.lane}
        together = [p for p in live if p.via is None and p.index not in seen and p.lane not in one_by_one]
        lanes: dict[str, list[_Prepared]] = {}
        for p in live:
            if p.via is not None or p.index in seen or p.lane in one_by_one:
                lanes.setdefault(p.lane or f"#{p.index}", []).append(p)
        try:  # outcomes land in `results` as each write finishes, for the give-back below
            await self._together(together, results)
            await asyncio.gather(*(self._in_order(lane, seen, results) for lane in lanes.values()))
        finally:
            # Also when the stream is cancelled (the client went away): a resend would find the
            # keys of items refused so far claimed before, and keep them for good.
            await asyncio.shield(self._give_back_refused(live, seen, results))
        if later:  # once the items ahead of them gave back what they were refused
            for p, outcome in zip(later, await self.run([items[p.index] for p in later]), strict=True):  # type: ignore[misc]
                results[p.index] = outcome
        return results

    async def _in_order(self, lane: list[_Prepared], seen: set[int], results: list[Any]) -> None:
        """One member's items one at a time, each as a single request would run."""
        for p in lane:
            outcome = await asyncio.gather(self._one(p, p.index in seen), return_exceptions=True)
            results[p.index] = _settled(outcome)[0]

    async def _give_back_refused(self, live: list[_Prepared], seen: set[int], results: list[Any]) -> None:
        """The keys this batch claimed for items then refused (nothing written), as a single
        request gives its key back: the corrected item may come again under it. A key named
        twice in the batch goes back only if every item under it was refused (one that posted
        keeps it; the store keeps a key whose result is stored anyway)."""
        by_key: dict[tuple[str, str], list[_Prepared]] = {}
        for p in live:
            by_key.setdefault((p.command.key.namespace, p.command.key.key), []).append(p)
        refused = {  # claimed by this batch (a later copy finds the first's claim: seen), all refused
            (p.command.key, p.fingerprint)
            for named in by_key.values()
            if named[0].index not in seen and all(isinstance(results[p.index], REFUSALS) for p in named)
            for p in named
        }
        await self.service.release_claims(sorted(refused, key=lambda r: (r[0].namespace, r[0].key, r[1])))

    async def _together(self, prepared: list[_Prepared], results: list[Any]) -> None:
        """First-time items in as few write units as the store allows: one per shard on
        SQLite (the whole shard commits atomically), one per member and at most WRITE_RUN
        items on Cassandra (it commits per member partition, in batches of bounded size).
        A unit runs its items in one ShardBook, so accounts are read once and rows are written
        in bulk."""
        svc = self.service
        refused = await _refusals([p.member_id for p in prepared], svc._require_active)
        unmerged = await _refusals([p.not_merged for p in prepared], svc._require_not_merged)
        groups: dict[tuple[int, str], list[_Prepared]] = {}
        for p in prepared:
            if p.member_id in refused:
                results[p.index] = refused[p.member_id]
            elif p.not_merged in unmerged:
                results[p.index] = unmerged[p.not_merged]
            elif svc.store.multi_member_units:
                groups.setdefault((p.shard, ""), []).append(p)
            else:
                # A reversal whose member was not found goes alone.
                groups.setdefault((p.shard, p.owner or f"#{p.index}"), []).append(p)
        await asyncio.gather(*(self._runs(shard, group, results) for (shard, _), group in groups.items()))

    async def _runs(self, shard: int, group: list[_Prepared], results: list[Any]) -> None:
        """A group's items in order, in runs of at most WRITE_RUN where the store commits per member."""
        step = len(group) if self.service.store.multi_member_units else WRITE_RUN
        for first in range(0, len(group), step):
            for index, outcome in await self._group(shard, group[first : first + step]):
                results[index] = outcome

    async def _group(self, shard: int, group: list[_Prepared]) -> list[tuple[int, Any]]:
        """The items in one unit, in order. One that fails rolls the unit back: the items
        before it run together again, it runs alone (its failure is its own answer) and the
        ones after it go on together."""
        svc = self.service
        out: list[tuple[int, Any]] = []
        while group:
            failed: list[int] = []
            written: list[Any] | None = None
            with contextlib.suppress(LedgerError):
                written = await svc.write(shard, self._unit(group, failed))
            if written is not None:
                out.extend((p.index, outcome) for p, outcome in zip(group, written, strict=True))
                break
            k = failed[-1] if failed else 0
            if k:
                out.extend(await self._group(shard, group[:k]))
            alone = await asyncio.gather(self._one(group[k], False), return_exceptions=True)
            out.append((group[k].index, _settled(alone)[0]))
            group = group[k + 1 :]
        return out

    def _unit(self, group: list[_Prepared], failed: list[int]) -> Callable[[ShardTx], list[tuple[Any, bool]]]:
        """The group's items in one ShardBook; the position of one that fails goes to `failed`."""
        svc = self.service

        def run(book: ShardBook) -> list[tuple[Any, bool]]:
            out = []
            for k, p in enumerate(group):
                try:
                    out.append(svc._run_idempotent(book, p.command, p.fingerprint, p.result_type, p.body))
                except LedgerError:
                    failed.append(k)
                    raise
            return out

        return svc._in_book(run)

    async def _one(self, p: _Prepared, maybe_replay: bool) -> tuple[Any, bool]:
        svc = self.service
        if p.via is not None:
            # Its use case answers a replay as the first time: whether a result is stored tells.
            stored = await svc._stored_result(p.command.key, p.fingerprint, p.shard, object) if maybe_replay else None
            return await p.via(p.command), stored is not None
        if maybe_replay:
            stored = await svc._stored_result(p.command.key, p.fingerprint, p.shard, p.result_type)
            if stored is not None:
                return stored, True
        if p.member_id:
            await svc._require_active(p.member_id)
        if p.not_merged:
            await svc._require_not_merged(p.not_merged)
        unit = svc._idempotent_unit(p.command, p.fingerprint, p.result_type, p.body)
        result: tuple[Any, bool] = await svc.write(p.shard, unit)
        return result

    async def _prepare(self, index: int, cmd: c.PostingCommand) -> _Prepared:
        """Stateless checks and routing; the member-status check waits for the replay lookup."""
        svc = self.service
        if isinstance(cmd, c.Earn):
            earn = svc._check_earn(cmd)
            await svc._require_exists(earn.member_id)
            return _Prepared(index, earn, svc.shard_of(earn.member_id), c.fingerprint(earn), EarnResult,
                             lambda b: svc._earn_body(b, earn), earn.member_id, earn.member_id)  # fmt: skip
        if isinstance(cmd, c.Redeem):
            red = svc._check_redeem(cmd)
            await svc._require_exists(red.member_id)
            # Batch files are trusted back-office feeds: not screened (docs/fraud.md).
            return _Prepared(index, red, svc.shard_of(red.member_id), c.fingerprint(red), RedeemResult,
                             lambda b: redeem_or_hold(b, red, None, hold_timeout=svc.policy.hold_max_timeout),
                             red.member_id, red.member_id)  # fmt: skip
        if isinstance(cmd, c.Adjust):
            adj = svc._check_adjust(cmd)
            await svc._require_exists(adj.member_id)
            return _Prepared(index, adj, svc.shard_of(adj.member_id), c.fingerprint(adj), Transaction,
                             lambda b: svc._adjust_body(b, adj), owner=adj.member_id,
                             not_merged=adj.member_id)  # fmt: skip
        rev = svc._check_reverse(cmd)
        owner = self.owners.get(rev.transaction_id, NO_OWNER)  # read by LedgerService.ingest
        # Its place is among the items of the member it takes points from (a resent stream's
        # redemption ahead of it is written first, as one by one): the heir's, when the earner
        # was merged away.
        if await svc._merged_owner(rev.transaction_id, owner.earned_by) is not None:
            # Reversing an earn of a merged member is a two-shard saga; the unary path runs it.
            return _Prepared(index, rev, svc.shard_of_id(rev.transaction_id), c.fingerprint(rev), ReverseResult,
                             lambda b: b, owner=owner.taken_from, via=svc.reverse)  # fmt: skip
        return _Prepared(index, rev, svc.shard_of_id(rev.transaction_id), c.fingerprint(rev), ReverseResult,
                         lambda b: svc.reverse_body(b, rev), owner=owner.taken_from)  # fmt: skip


@dataclass(frozen=True, slots=True)
class ReversalOwner:
    """Who a batch reversal concerns, read before the batch runs."""

    earned_by: str  # the member whose earn it names
    taken_from: str  # whose balance it takes back from: the merge heir if earned_by was merged away


NO_OWNER = ReversalOwner("", "")


def _deferred(prepared: list[_Prepared]) -> tuple[list[_Prepared], list[_Prepared]]:
    """(the items to run now, the ones to run after them, in a batch of their own). An item
    whose key an earlier item of the batch names with another payload waits: the earlier one
    may be refused and give the key back, and then this one (a corrected request under the
    same key) posts, as one by one; if the earlier posted, the key's claim refuses it as a
    conflict. Its member's items after it wait with it, so they keep their stream order."""
    first: dict[tuple[str, str], str] = {}
    waiting: set[str] = set()
    now: list[_Prepared] = []
    later: list[_Prepared] = []
    for p in prepared:
        other = first.setdefault((p.command.key.namespace, p.command.key.key), p.fingerprint) != p.fingerprint
        if other or (p.lane and p.lane in waiting):
            later.append(p)
            if p.lane:
                waiting.add(p.lane)
        else:
            now.append(p)
    return now, later


@dataclass(frozen=True, slots=True)
class _Prepared:
    index: int
    command: Any
    shard: int
    fingerprint: str
    result_type: type[Any]
    body: Callable[[ShardBook], Any]
    member_id: str = ""  # whose ACTIVE status must hold (adjust and reverse need none)
    owner: str = ""  # the member whose partition the item writes, when known before the write
    not_merged: str = ""  # a member who must not be merged away, checked after the replay (adjust)
    via: Callable[[Any], Awaitable[Any]] | None = None  # a use case that runs the item itself

    @property
    def lane(self) -> str:
        """The member whose items must keep their stream order ("": not known before the write)."""
        return self.owner or self.member_id


async def _refusals(members: Sequence[str], check: Callable[[str], Awaitable[None]]) -> dict[str, LedgerError]:
    """What `check` refuses, per member named (once each; "" names none)."""
    refused: dict[str, LedgerError] = {}
    for member_id in dict.fromkeys(m for m in members if m):
        try:
            await check(member_id)
        except LedgerError as exc:
            refused[member_id] = exc
    return refused


def _settled(outcomes: Sequence[Any]) -> list[Any]:
    """Items' outcomes, a LedgerError being an item's answer; anything else is a fault and raised."""
    for outcome in outcomes:
        if isinstance(outcome, BaseException) and not isinstance(outcome, LedgerError):
            raise outcome
    return list(outcomes)


def claim_many(
    d: DirectoryTx, claims: list[tuple[int, IdemKey, str, str]], now: datetime
) -> tuple[dict[int, LedgerError], set[int]]:
    """Claims every key of a batch; returns the conflicts and the items claimed before (replays)."""
    conflicts: dict[int, LedgerError] = {}
    seen: set[int] = set()
    first_in_batch: dict[tuple[str, str], str] = {}
    found = d.claim_many([(key.namespace, key.key, operation, fp) for _, key, operation, fp in claims], now)
    for (i, key, operation, fp), existing in zip(claims, found, strict=True):
        first = first_in_batch.setdefault((key.namespace, key.key), fp)
        if existing is not None and existing.fingerprint != fp:
            conflicts[i] = IdempotencyConflict(key.namespace, key.key, existing.operation, existing.created_at)
        elif first != fp:
            conflicts[i] = IdempotencyConflict(key.namespace, key.key, operation, now)
        elif existing is not None:
            seen.add(i)
    return conflicts, seen
