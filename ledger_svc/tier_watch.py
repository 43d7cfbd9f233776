"""Tier changes no purchase makes: a tier lapsing when its hold ends (grace included), and one
that a return, a reversal or a merge moved. A member watching the app hears of them as a
`tier_changed` event (with no purchase id), as they hear of an upgrade at the till.

Each member's state keeps the tier they were last told and when to look at it again
(`MemberState.tier_due`, indexed by the store): the purchase that sets a tier computes the
instant it drops with nothing more earned, and a return, reversal or merge makes it due at once.
Credits only ever push a lapse later, so a due time found too early costs one look, never a
missed change. The maintenance pass asks rules_svc for the standing under the version in
effect now (the ledger holds no program of its own) and writes the answer in a shard write
that first checks the state is still the one it asked about; one that moved meanwhile is left
for the next pass.

A version that moves tiers by itself (a threshold lowered or raised, a level renamed, a window
changed) moves no member's due time: each pass compares the tiers section of the version in
effect with the one each shard last looked at its members under (a digest in the shard's meta),
and on a difference walks every member of the shard who was told a tier, a few pages a pass,
looking at each as above; the digest is stored once the walk is through. Where a walk stands
is kept in the shard's meta too, page by page: a restarted ledger goes on from there, and
replicas sharing a Cassandra ledger share one walk rather than each walking every member. A
shard that never stored a digest (a new ledger, an upgrade) stores the one in effect without a
walk.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from ledger_svc import codec
from ledger_svc.accrual import EngineUnavailable
from ledger_svc.domain import FailedPrecondition, LedgerError, MemberStatus
from ledger_svc.postings import ShardBook
from ledger_svc.purchases import MemberState, load_state
from ledger_svc.store.base import ShardTx
from pointmesh.tiers import TierStanding

if TYPE_CHECKING:
    from ledger_svc.accrual import Accrual

log = logging.getLogger(__name__)

PAGE = 200  # members a shard looked at per page
PAGES_PER_PASS = 5  # a lapse date shared by many members is worked off over several passes
AT_ONCE = 8  # rules_svc calls in flight
RECHECK = timedelta(minutes=1)  # a due time rules_svc placed at or before the ledger's now
POLICY = "tier_policy"  # shard meta: digest of the tiers section its members were last looked at under
WALK = "tier_walk"  # shard meta: JSON [digest, last member looked at] of a walk under way
NO_TIERS = "no-tiers"


async def look_at_due_tiers(accrual: Accrual) -> int:
    """Looks at every member whose tier is due (a page at a time, bounded per pass); returns
    how many tier changes it announced. Stops at the first sign rules_svc is away: the members
    stay due for the next pass."""
    if accrual.engine is None:
        return 0
    svc, changed = accrual.svc, 0
    now = svc.clock.now()
    gate = asyncio.Semaphore(AT_ONCE)

    async def one(shard: int, member_id: str, told_only: bool = False) -> int:
        async with gate:
            return await _look(accrual, shard, member_id, now, told_only=told_only)

    for shard in range(svc.store.shard_count):
        seen: set[str] = set()
        for _ in range(PAGES_PER_PASS):
            due = await svc.store.read(shard, lambda tx: tx.tiers_due_by(now, PAGE))
            fresh = [m for m in due if m not in seen]  # one whose state moved meanwhile comes back
            if not fresh:
                break
            seen.update(fresh)
            results = await asyncio.gather(*(one(shard, m) for m in fresh), return_exceptions=True)
            for member_id, result in zip(fresh, results, strict=True):
                if isinstance(result, EngineUnavailable):
                    log.warning("tier lapses wait: rules_svc did not answer (%s)", result)
                    return changed
                if isinstance(result, BaseException):
                    log.error("tier of member %s not looked at", member_id, exc_info=result)
                else:
                    changed += result
            if len(due) < PAGE:
                break
    # After the due members, and apart: a walk that fails leaves lapses to be told all the same.
    try:
        changed += await _walk_if_policy_moved(accrual, now, one)
    except EngineUnavailable as exc:
        log.warning("the walk after a tier policy change waits: rules_svc did not answer (%s)", exc)
    except Exception:
        log.exception("the walk after a tier policy change failed; the next pass tries again")
    return changed


async def _walk_if_policy_moved(
    accrual: Accrual, now: datetime, one: Callable[[int, str, bool], Awaitable[int]]
) -> int:
    """Looks at the members of each shard whose stored digest is not the version in effect's,
    PAGES_PER_PASS pages of them a pass from where the walk stands (the shard's WALK meta: a
    page looked at twice, by a replica alongside or after a crash, tells nothing twice);
    EngineUnavailable stops it."""
    svc, changed = accrual.svc, 0
    digest = await _policy_digest(accrual, now)
    if digest is None:
        return 0
    for shard in range(svc.store.shard_count):
        seen, walk = await svc.store.read(shard, lambda tx: (tx.get_meta(POLICY), tx.get_meta(WALK)))
        if seen == digest or seen is None:
            if seen is None:  # members told under whatever came before: nothing to compare with
                await svc.store.write(shard, lambda tx: tx.put_meta(POLICY, digest))
            continue
        after = _walked_to(walk, digest)  # a newer change starts over
        for _ in range(PAGES_PER_PASS):
            page = await svc.store.read(shard, lambda tx: tx.member_ids_after(after, PAGE))  # noqa: B023 (awaited here)
            results = await asyncio.gather(*(one(shard, m, True) for m in page), return_exceptions=True)
            failed = []
            for member_id, result in zip(page, results, strict=True):
                if isinstance(result, EngineUnavailable):
                    raise result  # the page comes again: the walk stands where it stood
                if isinstance(result, BaseException):
                    log.error("tier of member %s not looked at after the tier policy changed; due now", member_id,
                              exc_info=result)  # fmt: skip
                    failed.append(member_id)
                else:
                    changed += result
            done = len(page) < PAGE
            if page:
                after = page[-1]

            def step(tx: ShardTx, members: list[str] = failed, last: str = after, through: bool = done) -> None:
                for member_id in members:  # looked at by the due pass instead
                    tx.set_tier_due(member_id, now)
                tx.put_meta(WALK, json.dumps([digest, "" if through else last]))
                if through:
                    tx.put_meta(POLICY, digest)

            await svc.store.write(shard, step)  # should it fail, the page comes again
            if done:
                log.info("shard %d: every member's tier looked at under the tier policy in effect", shard)
                break
    return changed


def _walked_to(walk: str | None, digest: str) -> str:
    """The last member a walk under `digest` looked at; '' to start (no walk, or one under an
    earlier change, or a value this version cannot read)."""
    try:
        walked_digest, last = json.loads(walk or "null") or ("", "")
    except (ValueError, TypeError):
        return ""
    return str(last) if walked_digest == digest else ""


async def _policy_digest(accrual: Accrual, now: datetime) -> str | None:
    """Digest of what places members in tiers under the version in effect at the ledger's now
    (its `tiers` section and the zone its months are counted in; NO_TIERS); None when it cannot
    be told this pass (logged). A version never changes once published, so each version's
    document is read once."""
    assert accrual.engine is not None
    try:
        _program, version, _standing = await accrual.engine.tier_status(accrual.program, {}, now)
    except FailedPrecondition:
        return NO_TIERS
    if version in accrual.tier_policies:
        return accrual.tier_policies[version]
    try:
        document = json.loads(await accrual.engine.program_document(accrual.program, version))
        placing = {"tiers": document["tiers"], "default_timezone": document["default_timezone"]}
    except (LedgerError, ValueError, KeyError, TypeError) as exc:
        log.error("the tier policy of %s version %d could not be read (%s); no walk this pass",
                  accrual.program, version, exc)  # fmt: skip
        return None
    digest = hashlib.sha256(json.dumps(placing, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    accrual.tier_policies[version] = digest
    return digest


async def _look(accrual: Accrual, shard: int, member_id: str, now: datetime, *, told_only: bool = False) -> int:
    """`told_only`: a member told no tier yet (a walk meets every member) is left alone: their
    first purchase tells it."""
    svc = accrual.svc
    state = await svc.store.read(shard, lambda tx: load_state(ShardBook(tx, now, svc.policy), member_id))
    if told_only and not state.tier:
        return 0
    standing = await _standing(accrual, member_id, state, state.tier_clock(now))

    def write(book: ShardBook) -> int:
        current = load_state(book, member_id)
        if current != state:  # a purchase, return or merge since: due again if it still is
            return 0
        tier = current.tier if standing is None else standing.tier
        due = None if standing is None else standing.held_until
        if due is not None and due <= book.now:
            due = book.now + RECHECK
        if told_only and tier == current.tier and due == current.tier_due:
            return 0  # a walk's member with nothing new: no write (on Cassandra, a conditional batch)
        # The state, and the due row once, always: a member made due by an upgrade (SQLite
        # opening an earlier shard, Cassandra's backfill) has the row without the state's field,
        # so keep_state's "only when it moved" would leave that row behind.
        book.tx.put_member_state(member_id, codec.dumps(replace(current, tier=tier, tier_due=due)))
        book.tx.set_tier_due(member_id, due)
        if not current.tier or tier == current.tier:
            return 0  # nothing told before (a merge's target that never bought) or nothing changed
        balance = book.balance(member_id, book.policy.units[0])
        book.emit("tier_changed", balance, {"tier_before": current.tier, "tier_after": tier, "purchase_id": ""})
        return 1

    return await svc._book(shard, write)


async def _standing(accrual: Accrual, member_id: str, state: MemberState, now: datetime) -> TierStanding | None:
    """rules_svc's standing for the member now; None when there is no tier to watch any more
    (merged away or erased, or the program has no tiers now)."""
    assert accrual.engine is not None
    member = await accrual.svc.member(member_id)
    if state.merged_into or member.status not in (MemberStatus.ACTIVE, MemberStatus.BLOCKED):
        return None
    try:
        _program, _version, standing = await accrual.engine.tier_status(accrual.program, dict(state.qualification), now)
    except FailedPrecondition:
        return None  # the version in effect has no tiers: nothing lapses
    except LedgerError as refused:
        log.error("rules_svc refused the tier of member %s (%s); no longer watched", member_id, refused)
        return None
    return standing
