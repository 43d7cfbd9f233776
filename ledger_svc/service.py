"""Ledger use cases: validate, check the member, claim the idempotency key, run the posting
in the member's shard, then invalidate the cache and wake the outbox relay.

Transfers and merges that span two shards run as sagas whose every step is idempotent, so a
crash between steps leaves a state `recover_sagas` completes.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import itertools
import logging
import os
import signal
import time
import unicodedata
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any, Generic, Protocol, TypeVar

from ledger_svc import codec, reviews
from ledger_svc import commands as c
from ledger_svc import validation as v
from ledger_svc.accrual import FUTURE_SKEW, Accrual, PointsEngine
from ledger_svc.domain import (
    DEFAULT_FUNDING,
    REFUSALS,
    Balance,
    EarnResult,
    ExternalId,
    FailedPrecondition,
    Hold,
    HoldResult,
    HoldStatus,
    IdemKey,
    IdempotencyConflict,
    InvalidArgument,
    LedgerError,
    MaintenanceReport,
    Member,
    MemberNotActive,
    MemberStatus,
    MergeResult,
    Money,
    NotFound,
    Page,
    ReverseResult,
    Transaction,
    bucket_of,
    bucket_of_id,
    is_valid_id,
    member_account,
    new_id,
    new_member_id,
)
from ledger_svc.ingest import ReversalOwner, claim_many
from ledger_svc.postings import Policy, ShardBook, to_transaction
from ledger_svc.purchases import capped_unreturned, credit_still_here, load_state, require_unmerged, untier
from ledger_svc.reconcile import ReconcileReport, reconcile
from ledger_svc.reviews import (
    PlacedHold,
    RedeemResult,
    Review,
    ReviewKind,
    ReviewStatus,
    TransferResult,
    hold_or_review,
    redeem_or_hold,
)
from ledger_svc.sagas import Sagas, sweep_decided
from ledger_svc.screening import (
    FraudDenied,
    FraudScreen,
    ScreenedKind,
    Screening,
    ScreeningContext,
    ScreeningRequest,
    Verdict,
)
from ledger_svc.screening import event_id as screening_event_id
from ledger_svc.store.base import PURGE_SLICE, DirectoryTx, IdemRecord, LedgerStore, ShardTx
from ledger_svc.tier_watch import look_at_due_tiers
from pointmesh.bounds import SCREENED_LATENESS
from pointmesh.clock import Clock
from pointmesh.timestamps import utc_instant

R = TypeVar("R")
TOTALS_MAX_AGE = timedelta(seconds=5)
log = logging.getLogger(__name__)
# Pauses (seconds) before each look for the result of a twin request that posted while this copy
# was refused (LedgerService.claimed_write).
TWIN_RESULT_WAITS = (0.0, 0.02, 0.05, 0.1)
EXTERNAL_KINDS_MAX = 16
CARD_DIGITS = (8, 19)  # a primary account number (ISO/IEC 7812) has 8 to 19 digits


def card_digits(value: str) -> str:
    """A card number's digits in ASCII, whatever script and separators it was written with."""
    return "".join(str(d) for ch in value if (d := unicodedata.decimal(ch, None)) is not None)


def _merged_chain(d: DirectoryTx, member_id: str) -> list[str]:
    """The members merged into `member_id`, directly or down a chain (A into B, B into C): a
    lookup by target each (indexed on SQLite), not a read of every merge."""
    found: list[str] = []
    todo = [member_id]
    while todo:
        for source in d.merged_into(todo.pop()):
            if source not in found and source != member_id:
                found.append(source)
                todo.append(source)
    return found


def _require_mergeable(source: Member, target: Member) -> None:
    """A merge goes into an active member, from one neither erased nor merged elsewhere."""
    if target.status != MemberStatus.ACTIVE:
        raise MemberNotActive(f"member {target.member_id} is {target.status.value}", field="target_member_id")
    if source.status == MemberStatus.MERGED and source.merged_into != target.member_id:
        raise FailedPrecondition(
            f"member {source.member_id} was merged into {source.merged_into}", field="source_member_id"
        )
    if source.status == MemberStatus.ERASED:
        raise MemberNotActive(f"member {source.member_id} is ERASED", field="source_member_id")


class BalanceCache(Protocol):
    async def get(self, member_id: str, unit: str) -> Balance | None: ...
    async def fill(self, balance: Balance) -> None: ...
    def invalidate(self, member_id: str, unit: str, version: int) -> None: ...
    def usable_for(self, member_id: str, unit: str) -> bool: ...
    async def settle(self) -> None: ...


class LedgerService:
    # Lots the expiry job looks at in one write; it pages through every due lot each run.
    expiry_page = 500
    maintenance_page = 500  # due pending credits or holds per write

    def __init__(
        self,
        store: LedgerStore,
        clock: Clock,
        policy: Policy,
        *,
        card_secret: str,
        cache: BalanceCache | None = None,
        fault_point: str = "",
        engine: PointsEngine | None = None,
        program: str = "aurora",
        fraud: FraudScreen | None = None,
    ) -> None:
        self.store = store
        self.clock = clock
        self.policy = policy
        self.cache = cache
        self.fraud = fraud
        self._card_secret = card_secret.encode()
        self._fault_point = fault_point
        self._status_cache: _MemberCache[MemberStatus] = _MemberCache()
        self._profiles: _MemberCache[Member] = _MemberCache()
        self.outbox_wakeup = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self.sagas = Sagas(self)
        self._totals: tuple[datetime, ReconcileReport] | None = None
        self.accrual = Accrual(self, engine, program)

    # Routing and plumbing ----------------------------------------------------------------

    def shard_of(self, member_id: str) -> int:
        return bucket_of(member_id) % self.store.shard_count

    def shard_of_id(self, object_id: str) -> int:
        return bucket_of_id(object_id) % self.store.shard_count

    def _fault(self, point: str) -> None:
        """Crash-test hook: dies exactly here, like a power cut, when configured to."""
        if self._fault_point == point:
            log.warning("fault injection: killing the process at %s", point)
            os.kill(os.getpid(), signal.SIGKILL)

    async def _claim(self, key: IdemKey, operation: str, fp: str) -> bool:
        """Claims the key; True when it was already claimed with this payload (a possible replay)."""
        return (await self._claim_all([(key, operation, fp)]))[0]

    async def _claim_all(self, claims: Sequence[tuple[IdemKey, str, str]]) -> list[bool]:
        """Claims (key, operation, fingerprint)s in one directory unit; for each, True when it was
        already claimed with this fingerprint. A key claimed with another fingerprint raises
        IdempotencyConflict, and then none of them is claimed."""
        now = self.clock.now()
        numbered = [(i, key, operation, fp) for i, (key, operation, fp) in enumerate(claims)]

        def unit(d: DirectoryTx) -> list[bool]:
            conflicts, seen = claim_many(d, numbered, now)
            if conflicts:
                raise conflicts[min(conflicts)]
            return [i in seen for i in range(len(claims))]

        return await self.store.write_directory(unit)

    async def release_claims(self, keys: Sequence[tuple[IdemKey, str]]) -> None:
        """Gives back keys (with the fingerprints they were claimed under) of requests refused
        with nothing written, in one directory unit: the corrected request may use them. A key
        another request holds, or whose result is stored, stays."""

        def release(d: DirectoryTx) -> None:
            for key, fp in keys:
                d.release_claim(key.namespace, key.key, fp)

        if keys:
            await self.store.write_directory(release)

    async def _stored_result(self, key: IdemKey, fp: str, shard: int, result_type: type[R]) -> R | None:
        """The result `shard` stored for this key and payload (fingerprint), if any."""
        record = await self.store.read(shard, lambda tx: tx.get_idempotency(key.namespace, key.key))
        if record is None or record.fingerprint != fp:
            return None
        return codec.loads(result_type, record.result_json)

    async def twin_result(self, key: IdemKey, fp: str, shard: int, result_type: type[R]) -> R | None:
        """The result a twin of a refused request (the same key and payload, sent at the same
        moment) stored. Cassandra makes a result findable by its key just after the write that
        the refusal saw: a moment's wait covers that."""
        for pause in TWIN_RESULT_WAITS:
            await asyncio.sleep(pause)
            stored = await self._stored_result(key, fp, shard, result_type)
            if stored is not None:
                return stored
        return None

    async def _mutate(
        self,
        command: Any,
        shard: int,
        result_type: type[R],
        body: Callable[[ShardBook], R],
        precheck: Callable[[], Awaitable[None]] | None = None,
    ) -> R:
        """Claims the key, then runs body in the shard with the idempotency record beside it.

        A replay returns the stored result before `precheck` (member status and other checks
        against current state), so a retry after the member was blocked still gets its answer.
        """
        fp = c.fingerprint(command)
        claimed_before = await self._claim(command.key, type(command).__name__, fp)
        if claimed_before:
            stored = await self._stored_result(command.key, fp, shard, result_type)
            if stored is not None:
                return stored

        async def run() -> tuple[R, bool]:
            if precheck is not None:
                await precheck()
            return await self.write(shard, self._idempotent_unit(command, fp, result_type, body))

        return (await self.claimed_write(command, fp, shard, claimed_before, result_type, run))[0]

    async def claimed_write(
        self, command: Any, fp: str, shard: int, claimed_before: bool, result_type: type[R],
        run: Callable[[], Awaitable[tuple[R, bool]]],
    ) -> tuple[R, bool]:  # fmt: skip
        """Runs the shard write of a command whose key is claimed, keeping the claim in step with
        what the shard ends up holding.

        Refused, with nothing written (the shard unit rolled back), the first request gives the
        key back, so a corrected retry may use it (a redemption refused for want of points, say);
        not after UNAVAILABLE, where the write may have applied. A retry that joined the claim
        while the first request was in flight (`claimed_before`, no result stored yet) may still
        post after the first gave the key back: whichever of the two acts last on the directory
        sees the other's doing and claims the key again, so a posted result never stands without
        its claim (another body under the key would then pass the directory and post too).

        A copy refused after its twin, sent at the same moment, posted (a return's lines already
        back, read on Cassandra before the twin's result was visible to it) answers with the
        twin's result, as a replay: it is the same request."""
        try:
            done = await run()
        except REFUSALS:
            if claimed_before:
                twin = await self.twin_result(command.key, fp, shard, result_type)
                if twin is not None:
                    return twin, True
            else:
                key = command.key
                await self.release_claims([(key, fp)])
                stored = await self._stored_result(key, fp, shard, result_type)
                if stored is not None:  # a copy that joined the claim posted meanwhile: its answer is this one's
                    await self._keep_claim(command, fp)
                    return stored, True
            raise
        if claimed_before and not done[1]:
            await self._keep_claim(command, fp)
        return done

    async def _keep_claim(self, command: Any, fp: str) -> None:
        """Claims the key of a command whose result the shard holds, if it lost its claim."""
        key = command.key
        try:
            await self._claim(key, type(command).__name__, fp)
        except IdempotencyConflict as conflict:  # another body took the key in the moment it was free
            log.error("idempotency key %s/%s: posted, but another %s request claimed the key meanwhile",
                      key.namespace, key.key, conflict.original_operation)  # fmt: skip

    def _idempotent_unit(
        self, cmd: Any, fp: str, rtype: type[R], body: Callable[[ShardBook], R]
    ) -> Callable[[ShardTx], tuple[R, bool]]:
        """The shard half of idempotency: replay the stored result, or run and store it."""
        return self._in_book(lambda book: self._run_idempotent(book, cmd, fp, rtype, body))

    def _in_book(self, body: Callable[[ShardBook], R]) -> Callable[[ShardTx], R]:
        """A unit of work running `body` in its own ShardBook; the balances it touched are
        invalidated, and the relay woken, once it commits."""

        def unit(tx: ShardTx) -> R:
            book = ShardBook(tx, self.clock.now(), self.policy)
            result = body(book)
            self._committed_later(book.touched)
            return result

        return unit

    @staticmethod
    def _run_idempotent(
        book: ShardBook, cmd: Any, fp: str, rtype: type[R], body: Callable[[ShardBook], R]
    ) -> tuple[R, bool]:
        """Replays the stored result, or runs `body` in `book` and stores its result beside it."""
        key: IdemKey = cmd.key
        record = book.tx.get_idempotency(key.namespace, key.key)
        if record is not None:
            if record.fingerprint != fp:
                # The directory claim is the guard; this is its backstop in the shard (a claim
                # given back by a refused attempt while a retry of it went through).
                raise IdempotencyConflict(key.namespace, key.key, record.operation, record.created_at)
            return codec.loads(rtype, record.result_json), True
        result = body(book)
        book.tx.put_idempotency(
            key.namespace, key.key, IdemRecord(type(cmd).__name__, fp, codec.dumps(result), book.now)
        )
        return result, False

    async def write(self, shard: int, unit: Callable[[ShardTx], R]) -> R:
        """Every ledger write goes through here: once the store has it, the balances it touched
        are invalidated where other replicas will see it (BalanceCache.settle) before anyone
        is answered. `_after_write` has run by then: the unit schedules it before it returns,
        and the store's completion is scheduled after that."""
        result = await self.store.write(shard, unit)
        if self.cache is not None:
            await self.cache.settle()
        return result

    async def _book(self, shard: int, body: Callable[[ShardBook], R]) -> R:
        """Runs a non-idempotent-key unit (jobs, saga steps) and invalidates what it touched."""
        return await self.write(shard, self._in_book(body))

    def _committed_later(self, touched: list[Balance]) -> None:
        """Called in the store thread; cache invalidation and the relay wake-up run on the loop.

        A unit rolled back after this ran only causes a harmless extra invalidation.
        """
        if not touched:
            return
        self._loop.call_soon_threadsafe(self._after_write, list(touched))

    def _after_write(self, touched: list[Balance]) -> None:
        self.outbox_wakeup.set()
        if self.cache is not None:
            for balance in touched:
                self.cache.invalidate(balance.member_id, balance.unit, balance.version)

    async def member(self, member_id: str, field: str = "member_id") -> Member:
        v.member_id(member_id, field)
        found = await self.store.read_directory(lambda d: d.get_member(member_id))
        if found is None:
            raise NotFound(f"member {member_id} does not exist", field=field)
        return found

    async def _status(self, member_id: str, field: str) -> MemberStatus:
        status = self._status_cache.get(member_id)
        if status is None:
            status = self._remember(await self.member(member_id, field)).status
        return status

    def _remember(self, member: Member) -> Member:
        """One directory read refreshes both caches (status and profile lapse together)."""
        self._status_cache.put(member.member_id, member.status)
        self._profiles.put(member.member_id, member)
        return member

    async def warm_members(self, member_ids: Iterable[str]) -> None:
        """Loads the members a batch names that the caches miss, in one directory read
        instead of one each (ids that are not member ids are left to the checks)."""
        missing = sorted(
            {
                m
                for m in member_ids
                if is_valid_id(m, "m") and None in (self._status_cache.get(m), self._profiles.get(m))
            }
        )
        if not missing:
            return
        found = await self.store.read_directory(lambda d: [d.get_member(m) for m in missing])
        for member in found:
            if member is not None:
                self._remember(member)

    async def member_profile(self, member_id: str) -> dict[str, str]:
        """Segments and attributes the rules may target; profiles only change by erasure."""
        return (await self._known_member(member_id)).profile

    async def member_since(self, member_id: str) -> datetime:
        return (await self._known_member(member_id)).created_at

    async def _known_member(self, member_id: str) -> Member:
        """The member as created (profile, start date): fields that only erasure changes."""
        member = self._profiles.get(member_id)
        if member is None:
            member = self._remember(await self.member(member_id))
        return member

    async def _require_active(self, member_id: str, field: str = "member_id") -> None:
        v.member_id(member_id, field)
        status = await self._status(member_id, field)
        if status != MemberStatus.ACTIVE:
            raise MemberNotActive(f"member {member_id} is {status.value}", field=field)

    async def _require_not_merged(self, member_id: str) -> None:
        """Adjustments reach blocked and erased members, never one merged away."""
        await self._require_exists(member_id)
        # Erasure replaces MERGED in the status but never where the points went: merged_into.
        if (await self.member(member_id)).merged_into:
            raise MemberNotActive(
                f"member {member_id} was merged; adjust the member it was merged into", field="member_id"
            )

    async def _reversal_owners(self, items: Sequence[Any]) -> dict[str, ReversalOwner]:
        """Whose earn each batch reversal names and whose points it takes back, by transaction
        id (a reversal names a transaction, not a member): so it keeps its place among the items
        of the member it takes from, the merge heir when the earner was merged away. One whose
        transaction is not there, or not well formed, has none: its write says why."""

        async def owner(tx_id: str) -> tuple[str, ReversalOwner]:
            try:
                found = await self.store.read(self.shard_of_id(tx_id), lambda tx: tx.get_transaction(tx_id))
                if found is None:
                    return tx_id, ReversalOwner("", "")
                merged = await self._merged_owner(tx_id, found.member_id)
                heir = "" if merged is None else await self.merge_heir(merged, "transaction_id")
            except LedgerError:
                return tx_id, ReversalOwner("", "")
            return tx_id, ReversalOwner(found.member_id, heir or found.member_id)

        ids = dict.fromkeys(i.transaction_id for i in items if isinstance(i, c.Reverse))
        return dict(await asyncio.gather(*(owner(tx_id) for tx_id in ids)))

    async def _merged_owner(self, tx_id: str, owner_id: str = "") -> Member | None:
        """The member an earn belonged to, when that member has since been merged away (and
        maybe erased since: erasure wipes its profile, never where its points went).
        `owner_id`: that member, when the caller read the earn already (a batch reversal)."""
        if not owner_id:
            original = await self.store.read(self.shard_of_id(tx_id), lambda tx: tx.get_transaction(tx_id))
            if original is None:
                return None
            owner_id = original.member_id
        if await self._status(owner_id, "transaction_id") == MemberStatus.ACTIVE:
            return None
        owner = await self.member(owner_id, "transaction_id")
        return owner if owner.merged_into else None

    async def merge_heir(self, member: Member, field: str = "member_id") -> str:
        """Where a merged-away member's points live now: the end of its merge chain (A into B,
        B later into C: C), or "" if it was never merged."""
        heir, seen = "", {member.member_id}
        while member.merged_into:
            heir = member.merged_into
            if heir in seen:
                raise FailedPrecondition(f"members {sorted(seen)} were merged into each other", field=field)
            seen.add(heir)
            member = await self.member(heir, field)
        return heir

    async def merged_into_member(self, member_id: str) -> list[str]:
        """The members merged into this one, directly or down a chain (A into B, B into C)."""
        return await self.store.read_directory(lambda d: _merged_chain(d, member_id))

    def _active(self, member_id: str, field: str = "member_id") -> Callable[[], Awaitable[None]]:
        """The member-status check, deferred so a replay can answer before it."""
        return lambda: self._require_active(member_id, field)

    async def _require_exists(self, member_id: str, field: str = "member_id") -> None:
        v.member_id(member_id, field)
        await self._status(member_id, field)

    # Members -----------------------------------------------------------------------------

    def _card_token(self, digits: str) -> ExternalId:
        """Payment card numbers are never stored: only a keyed hash that still finds the member."""
        digest = hmac.new(self._card_secret, digits.encode(), hashlib.sha256).hexdigest()
        return ExternalId("payment_card", f"hmac:{digest}")

    def _check_external(self, ext: ExternalId, field: str) -> ExternalId:
        """The external id as stored: a payment card as the token of its digits."""
        v.name(ext.kind, f"{field}.kind")
        v.required_text(ext.value, f"{field}.value", max_len=128)
        if ext.kind != "payment_card":
            return ext
        # Only the digits are hashed: a value with none, or with other characters dropped,
        # would find whichever member was enrolled with another such value.
        if any(not (ch.isspace() or unicodedata.category(ch) == "Pd" or unicodedata.decimal(ch, None) is not None)
               for ch in ext.value):  # fmt: skip
            raise InvalidArgument("a payment card number is digits, spaces and dashes", field=f"{field}.value")
        digits = card_digits(ext.value)
        if not CARD_DIGITS[0] <= len(digits) <= CARD_DIGITS[1]:
            raise InvalidArgument(
                f"a payment card number has {CARD_DIGITS[0]} to {CARD_DIGITS[1]} digits", field=f"{field}.value"
            )
        return self._card_token(digits)

    async def create_member(self, cmd: c.CreateMember) -> Member:
        key = v.idem_key(cmd.key)
        if len(cmd.external_ids) > EXTERNAL_KINDS_MAX:
            raise InvalidArgument(f"at most {EXTERNAL_KINDS_MAX} external ids", field="external_ids")
        ids = tuple(self._check_external(e, f"external_ids[{i}]") for i, e in enumerate(cmd.external_ids))
        if len({(e.kind, e.value) for e in ids}) != len(ids):
            raise InvalidArgument("the same external id is listed twice", field="external_ids")
        for k, val in cmd.profile.items():
            v.name(k, f"profile[{k}]")
            v.optional_text(val, f"profile[{k}]", max_len=500)
        cmd = c.CreateMember(key, ids, dict(cmd.profile))
        fp = c.fingerprint(cmd)
        now = self.clock.now()

        def unit(d: DirectoryTx) -> Member:
            existing = d.claim(key.namespace, key.key, "CreateMember", fp, now)
            member_id, created_at = new_member_id(), now
            if existing is not None:
                if existing.fingerprint != fp:
                    raise IdempotencyConflict(key.namespace, key.key, existing.operation, existing.created_at)
                previous = d.get_member(existing.result_json) if existing.result_json else None
                if previous is not None:
                    return previous
                if existing.result_json:
                    # A store that claims before it writes (Cassandra) names the member in the
                    # claim first: an earlier attempt is still at it, or stopped. Finish that one.
                    member_id, created_at = existing.result_json, existing.created_at
            for i, ext in enumerate(ids):
                owner = d.external_id_owner(ext)
                if owner is not None and owner != member_id:
                    raise FailedPrecondition(
                        f"external id {ext.kind}:{ext.value if ext.kind != 'payment_card' else '***'} already "
                        f"belongs to member {owner}",
                        field=f"external_ids[{i}]",
                    )
            member = Member(member_id, MemberStatus.ACTIVE, ids, (), dict(cmd.profile), "", created_at)
            d.add_member(member)
            d.complete_claim(key.namespace, key.key, member.member_id)
            return member

        return await self.store.write_directory(unit)

    async def get_member(self, member_id: str) -> Member:
        return await self.member(member_id)

    async def lookup_member(self, ext: ExternalId) -> Member:
        raw, ext = ext, self._check_external(ext, "external_id")
        member_id = await self.store.read_directory(lambda d: d.find_member_id(ext))
        if member_id is None and ext.kind == "payment_card" and not raw.value.isascii():
            # Enrolled before 2026-12-05, when other scripts' digits were hashed as written.
            legacy = self._card_token("".join(ch for ch in raw.value if ch.isdigit()))
            member_id = await self.store.read_directory(lambda d: d.find_member_id(legacy))
        if member_id is None:
            raise NotFound("no member has this external id", field="external_id")
        return await self.member(member_id)

    async def set_blocked(self, cmd: c.SetMemberBlocked) -> Member:
        key = v.idem_key(cmd.key)
        current = await self.member(cmd.member_id)
        fp = c.fingerprint(cmd)
        if current.status in (MemberStatus.MERGED, MemberStatus.ERASED):
            # A block sent again (its answer lost) after the member was merged or erased answers
            # as the first time did, with the member as it is; a new one is refused, its key given
            # back, and so is a copy of it sent at once (its claim holds no answer).
            existing = await self.store.write_directory(lambda d: d.claim(key.namespace, key.key,
                                                                          type(cmd).__name__, fp, self.clock.now()))  # fmt: skip
            if existing is None:
                await self.release_claims([(key, fp)])
            elif existing.fingerprint != fp:
                raise IdempotencyConflict(key.namespace, key.key, existing.operation, existing.created_at)
            elif existing.result_json:
                return current
            raise FailedPrecondition(f"member {cmd.member_id} is {current.status.value}", field="member_id")
        status = MemberStatus.BLOCKED if cmd.blocked else MemberStatus.ACTIVE
        now = self.clock.now()

        def unit(d: DirectoryTx) -> None:
            """Claim, status and completion in one transaction: a retry either replays or applies."""
            existing = d.claim(key.namespace, key.key, type(cmd).__name__, fp, now)
            if existing is not None:
                if existing.fingerprint != fp:
                    raise IdempotencyConflict(key.namespace, key.key, existing.operation, existing.created_at)
                if existing.result_json:
                    return  # applied when the key was first used; a later unblock stands
            # Read again under the write: a merge or erasure that landed since the check above
            # must not be undone (the member back to ACTIVE on unblock, its merge target lost).
            now_member = d.get_member(cmd.member_id)
            if now_member is not None and now_member.status in (MemberStatus.MERGED, MemberStatus.ERASED):
                raise FailedPrecondition(f"member {cmd.member_id} is {now_member.status.value}", field="member_id")
            d.set_blocked(cmd.member_id, cmd.blocked)
            d.complete_claim(key.namespace, key.key, status.value)

        await self.store.write_directory(unit)
        self._status_cache.pop(cmd.member_id)
        return await self.member(cmd.member_id)

    async def erase_member(self, cmd: c.EraseMember) -> Member:
        key = v.idem_key(cmd.key)
        await self.member(cmd.member_id)
        await self._claim(key, type(cmd).__name__, c.fingerprint(cmd))

        # The person's other accounts merged into this one go too: their profiles would outlive
        # the erasure (the merge keeps where their points went, never who they were). They are
        # looked up in the write, which runs apart from merges (in any replica): a merge into
        # this member that committed after a lookup made outside would keep its source's profile.
        def unit(d: DirectoryTx) -> list[str]:
            erased = [cmd.member_id, *_merged_chain(d, cmd.member_id)]
            for member_id in erased:
                d.erase(member_id)
            return erased

        erased = await self.store.write_directory_alone("merge", unit)
        for member_id in erased:
            self._status_cache.put(member_id, MemberStatus.ERASED)
            self._profiles.pop(member_id)
        return await self.member(cmd.member_id)

    async def merge_members(self, cmd: c.MergeMembers) -> MergeResult:
        key = v.idem_key(cmd.key)
        source = await self.member(cmd.source_member_id, "source_member_id")
        target = await self.member(cmd.target_member_id, "target_member_id")
        if source.member_id == target.member_id:
            raise InvalidArgument("a member cannot be merged into itself", field="target_member_id")
        fp = c.fingerprint(cmd)
        replay = await self._claim(key, type(cmd).__name__, fp)
        if replay and source.merged_into == target.member_id:
            # Answered as the first time, whatever became of the target since (each step of the
            # merge is idempotent, so a first call cut off half-way is finished here, to the end of
            # the chain if the target was merged on since).
            moved = await self.sagas.complete_merge(source.member_id, await self.sagas.heir_of(source.member_id))
            return MergeResult(await self.member(target.member_id), moved)
        try:
            await self._mark_merged(source, target)
        except REFUSALS:
            # Refused with nothing written: the key is given back, so the merge asked again once
            # the holds are settled (or into another member) may use it, as every posting may.
            # A copy that joined the claim leaves it to the first, which may be merging now.
            if not replay:
                await self.release_claims([(key, fp)])
            raise
        moved = await self.sagas.complete_merge(source.member_id, target.member_id)
        return MergeResult(await self.member(target.member_id), moved)

    async def _mark_merged(self, source: Member, target: Member) -> None:
        """Checks that the source can go, then marks it merged: from then on nothing posts to it."""
        _require_mergeable(source, target)
        src_shard = self.shard_of(source.member_id)

        def unsettled(tx: ShardTx) -> tuple[int, int, int, int]:
            member = source.member_id
            # Only a hold nothing owns is the caller's to capture or void: one a fraud review
            # owns names the open review instead, one a transfer's saga owns the transfer.
            held = tx.placed_holds_of(member)
            return (len([h for h in held if not h.saga_id]),
                    len(tx.list_reviews(ReviewStatus.OPEN.value, member, None, 100)),
                    len([h for h in held if h.saga_id.startswith("tr_")]),
                    tx.member_waiting_purchases(member))  # fmt: skip

        # What settles later on the source's own accounts must settle first: a decision, a
        # capture or a late quote landing on a merged-away member would strand its points.
        holds, open_reviews, transfers, waiting = await self.store.read(src_shard, unsettled)
        for count, what, action in ((holds, "open holds", "capture or void them"),
                                    (open_reviews, "open fraud reviews", "decide them"),
                                    (transfers, "transfers in flight", "retry once they completed"),
                                    (waiting, "purchases waiting for the points engine", "retry once they earned")):  # fmt: skip
            if count:
                raise FailedPrecondition(
                    f"member {source.member_id} has {count} {what}; {action} first", field="source_member_id"
                )

        # Block postings to the source first, so nothing lands on it while its points move. The
        # statuses read above are read again in that write: two merges sent at once, A into B
        # and B into A, would otherwise both pass and leave the points with no active member.
        def mark_merged(d: DirectoryTx) -> None:
            # Members are never deleted (erasure keeps the row): both are still there.
            now_source, now_target = d.get_member(source.member_id), d.get_member(target.member_id)
            _require_mergeable(now_source or source, now_target or target)
            d.set_status(source.member_id, MemberStatus.MERGED, target.member_id)

        # On Cassandra the write commits per member, so two merges in opposite directions (or a
        # ring of three) could both read their target active: merges go one at a time.
        await self.store.write_directory_alone("merge", mark_merged)
        self._status_cache.put(source.member_id, MemberStatus.MERGED)

    # Postings ----------------------------------------------------------------------------

    def _check_earn(self, cmd: c.Earn) -> c.Earn:
        v.idem_key(cmd.key)
        v.positive_points(cmd.points)
        v.optional_text(cmd.reference, "reference")
        if cmd.purchase is not None:
            v.money(cmd.purchase, "purchase_amount")
        if cmd.expires_at is not None and cmd.business_time is not None and cmd.expires_at <= cmd.business_time:
            raise InvalidArgument("must be later than the business time", field="expires_at")
        expiry = cmd.expires_at
        if expiry is None:
            try:
                expiry = self.policy.default_expiry(cmd.business_time or self.clock.now())
            except OverflowError:  # refused before the key is claimed: a corrected retry may use it
                raise InvalidArgument(
                    f"is too late: points earned then would expire {self.policy.expiry_days} days later, after year 9999",
                    field="business_time",
                ) from None
        if cmd.release_at is not None and expiry is not None and cmd.release_at >= expiry:  # never spendable
            raise InvalidArgument(
                f"must be before the points expire ({expiry.isoformat()}): they could never be spent",
                field="release_at",
            )
        return c.Earn(
            key=v.idem_key(cmd.key), member_id=v.member_id(cmd.member_id), unit=v.unit(cmd.unit, self.policy.units),
            points=cmd.points, funding_source=v.name(cmd.funding_source or DEFAULT_FUNDING, "funding_source"),
            business_time=cmd.business_time, expires_at=cmd.expires_at, release_at=cmd.release_at,
            pending_review=cmd.pending_review, purchase=cmd.purchase, reference=cmd.reference,
        )  # fmt: skip

    async def earn(self, cmd: c.Earn) -> EarnResult:
        cmd = self._check_earn(cmd)
        await self._require_exists(cmd.member_id)
        return await self._mutate(
            cmd,
            self.shard_of(cmd.member_id),
            EarnResult,
            lambda b: self._earn_body(b, cmd),
            self._active(cmd.member_id),
        )

    @staticmethod
    def _earn_body(book: ShardBook, cmd: c.Earn) -> EarnResult:
        require_unmerged(cmd.member_id, load_state(book, cmd.member_id))
        return book.earn(
            cmd.member_id, cmd.unit, cmd.points, funding_source=cmd.funding_source,
            business_time=cmd.business_time, expires_at=cmd.expires_at, release_at=cmd.release_at,
            pending_review=cmd.pending_review, purchase=cmd.purchase, reference=cmd.reference,
        )  # fmt: skip

    def _check_redeem(self, cmd: c.Redeem) -> c.Redeem:
        v.positive_points(cmd.points)
        v.optional_text(cmd.reference, "reference")
        # A spend is screened at its business time: one dated ahead would have fraud_svc's
        # velocity state trimmed to it (every member's counts at that store and device gone).
        # One dated further back than fraud_svc scores would be refused there and decided by the
        # unavailable policy, which lets small redemptions through unscored (a blocked device too).
        if cmd.business_time is not None:
            now = self.clock.now()
            if cmd.business_time > now + FUTURE_SKEW:
                raise InvalidArgument(f"{cmd.business_time.isoformat()} is in the future", field="business_time")
            if cmd.business_time < now - SCREENED_LATENESS:
                raise InvalidArgument(
                    f"{cmd.business_time.isoformat()} is more than {SCREENED_LATENESS.days} days ago; a spend may"
                    f" be dated at most {SCREENED_LATENESS.days} days back", field="business_time",
                )  # fmt: skip
        return c.Redeem(v.idem_key(cmd.key), v.member_id(cmd.member_id), v.unit(cmd.unit, self.policy.units),
                        cmd.points, cmd.business_time, cmd.reference,
                        v.screening_context(cmd.context, self.clock.now()))  # fmt: skip

    async def redeem(self, cmd: c.Redeem) -> RedeemResult:
        """Screened by fraud_svc (after the replay check, so a retry never scores twice): allowed
        redemptions post, reviewed ones become a hold owned by a review item, denied ones fail."""
        cmd = self._check_redeem(cmd)
        await self._require_exists(cmd.member_id)
        screened: list[Screening | None] = [None]

        async def precheck() -> None:
            await self._active(cmd.member_id)()
            screened[0] = await self._screen_spend("redeem", cmd.key, cmd.member_id, cmd.unit, cmd.points,
                                                   cmd.business_time, cmd.context)  # fmt: skip

        def body(b: ShardBook) -> RedeemResult:
            return redeem_or_hold(b, cmd, screened[0], hold_timeout=self.policy.hold_max_timeout)

        result = await self._mutate(cmd, self.shard_of(cmd.member_id), RedeemResult, body, precheck)
        if result.hold is None or (decided := await self._decided(result.hold)) is None:
            return result
        hold, paid = decided
        return RedeemResult(paid, None, result.screening) if paid else RedeemResult(None, hold, result.screening)

    async def _decided(self, held: Hold) -> tuple[Hold, Transaction | None] | None:
        """A spend held for review and answered again (a till retrying with its key): where it
        stands now, as a retried transfer says, not the hold as placed. None while the review is
        open; else the hold as decided, with the capture's transaction when it was approved."""
        if not held.saga_id.startswith("rv_"):
            return None

        def read(tx: ShardTx) -> tuple[Hold, Transaction | None] | None:
            hold = tx.get_hold(held.hold_id)
            if hold is None or hold.status is HoldStatus.PLACED:
                return None
            body = tx.get_review(held.saga_id)
            made = codec.loads(Review, body).outcome_transaction_ids if body is not None else ()
            record = tx.get_transaction(made[0]) if made and hold.status is HoldStatus.CAPTURED else None
            return hold, to_transaction(record) if record is not None else None

        return await self.store.read(self.shard_of_id(held.hold_id), read)

    async def _screen_spend(
        self, what: str, key: IdemKey, member_id: str, unit: str, points: int, at: datetime | None,
        context: ScreeningContext, *, kind: ScreenedKind = ScreenedKind.REDEMPTION, counterparty: str = "",
    ) -> Screening | None:  # fmt: skip
        """fraud_svc's verdict on spending points (a redemption, a hold its caller can capture,
        or a transfer to another member); DENY is refused here."""
        if self.fraud is None:
            return None
        # From the store: spending never reads the cache (a stale balance could send a
        # redemption down the unscored policy, and a frozen Redis would stall every spend).
        balance = await self.stored_balance(member_id, unit)
        request = ScreeningRequest(
            event_id=screening_event_id(what, key.namespace, key.key), kind=kind,
            member_id=member_id, occurred_at=at or self.clock.now(), context=context, points=points, amount=None,
            balance_points=balance.available_points, member_since=await self.member_since(member_id),
            counterparty_member_id=counterparty,
        )  # fmt: skip
        # Scored even when the balance looks short: points freed between this read and the
        # write (an earn, or the caller voiding its own hold) would otherwise let an unscored
        # spend through under the policy. A retry has the same event id, so fraud_svc counts
        # one request once however often it is refused and sent again.
        screening = await self.fraud.screen(request)
        if screening.verdict is Verdict.DENY:
            raise FraudDenied(screening, "source_member_id" if kind is ScreenedKind.TRANSFER else "member_id")
        return screening

    # Fraud review ------------------------------------------------------------------------

    async def list_reviews(
        self, status: ReviewStatus, member_id: str, page_size: int, page_token: str
    ) -> tuple[list[Review], str]:
        """Oldest first across every shard; the token is the (time, id) of the last one returned."""
        if member_id:
            await self._require_exists(member_id)
        size = v.page_size(page_size, "page_size")
        after = _review_cursor(page_token)
        shards = [self.shard_of(member_id)] if member_id else list(range(self.store.shard_count))
        found: list[tuple[datetime, str, str]] = []
        for shard in shards:
            found += await self.store.read(shard, lambda tx: tx.list_reviews(status.value, member_id, after, size + 1))
        found.sort()
        page = [codec.loads(Review, body) for _, _, body in found[:size]]
        token = f"{page[-1].created_at.isoformat()}|{page[-1].review_id}" if len(found) > size else ""
        return page, token

    async def decide_review(self, cmd: c.DecideReview) -> Review:
        v.object_id(cmd.review_id, "rv", "review_id")
        v.required_text(cmd.operator_id, "operator_id", max_len=128)
        v.optional_text(cmd.note, "note", max_len=500)
        cmd = replace(cmd, key=v.idem_key(cmd.key))
        shard = self.shard_of_id(cmd.review_id)

        async def may_approve() -> None:
            """Approval releases a credit, captures a redemption or moves a transfer: the member
            who gets or spends the points may have been blocked or erased since (a takeover
            confirmed, a ring collector found), and then it is refused here, as a new purchase or
            redemption would be, and ops rejects the review instead. A member merged away since
            answers through the member its points went to."""
            body = await self.store.read(shard, lambda tx: tx.get_review(cmd.review_id)) if cmd.approve else None
            review = codec.loads(Review, body) if body is not None else None
            if review is None or review.status is not ReviewStatus.OPEN:
                return
            if review.kind is not ReviewKind.TRANSFER:
                await require_active("the member", review.member_id, follow_merge=True)
                return
            await require_active("the transfer's sender", review.member_id, follow_merge=False)
            # A recipient merged away is paid where its points live: that member must be active.
            await require_active("the transfer's recipient", review.counterparty_member_id, follow_merge=True)

        async def require_active(role: str, member_id: str, *, follow_merge: bool) -> None:
            # Read from the directory, not this replica's cache: a block made through another
            # replica a moment ago is what ops is reacting to.
            member = await self.member(member_id, "review_id")
            heir = await self.merge_heir(member, "review_id") if follow_merge and member.merged_into else ""
            live = await self.member(heir, "review_id") if heir else member
            if live.status is not MemberStatus.ACTIVE:
                named = f"{member_id} (merged into {heir})" if heir else member_id
                raise MemberNotActive(f"{role} {named} is {live.status.value}; reject the review", field="review_id")

        decided = await self._mutate(
            cmd, shard, Review, lambda b: self._decide_in(b, cmd),
            may_approve,
        )  # fmt: skip
        if decided.kind is ReviewKind.TRANSFER and decided.status is ReviewStatus.APPROVED:
            try:
                await self.sagas.drive_transfer(decided.transfer_id)
            except LedgerError:  # the decision stands; maintenance drives the saga on
                log.exception("approved transfer %s could not be completed yet", decided.transfer_id)
        await self.sagas.follow_merge(decided.member_id, decided.review_id)  # a member merged away since
        return decided

    @staticmethod
    def _decide_in(book: ShardBook, cmd: c.DecideReview) -> Review:
        decided = reviews.decide(book, cmd.review_id, cmd.approve, cmd.operator_id, cmd.note)
        if decided.kind is ReviewKind.EARN and decided.status is ReviewStatus.REJECTED:
            for tx_id in decided.outcome_transaction_ids:  # the reversals of the held earns
                reversal = book.tx.get_transaction(tx_id)
                if reversal is not None:
                    untier(book, reversal.original_tx, -reversal.points)
        # A member merged away since the review opened: the outcome follows the merge, with the
        # tier credits and cap use the rejection gave back (so after them).
        sweep_decided(book, decided)
        return decided

    def _check_adjust(self, cmd: c.Adjust) -> c.Adjust:
        if cmd.points == 0:
            raise InvalidArgument("must not be zero", field="points")
        v.positive_points(abs(cmd.points))
        v.required_text(cmd.reason, "reason")
        v.optional_text(cmd.operator_id, "operator_id")
        return c.Adjust(v.idem_key(cmd.key), v.member_id(cmd.member_id), v.unit(cmd.unit, self.policy.units),
                        cmd.points, cmd.reason, cmd.operator_id)  # fmt: skip

    async def adjust(self, cmd: c.Adjust) -> Transaction:
        cmd = self._check_adjust(cmd)
        await self._require_exists(cmd.member_id)
        return await self._mutate(
            cmd, self.shard_of(cmd.member_id), Transaction,
            lambda b: self._adjust_body(b, cmd),
            lambda: self._require_not_merged(cmd.member_id),  # after the replay check: a replay answers
        )  # fmt: skip

    @staticmethod
    def _adjust_body(book: ShardBook, cmd: c.Adjust) -> Transaction:
        require_unmerged(cmd.member_id, load_state(book, cmd.member_id))  # a merge since the check above
        return book.adjust(cmd.member_id, cmd.unit, cmd.points, reason=cmd.reason, operator_id=cmd.operator_id)

    async def place_hold(self, cmd: c.PlaceHold) -> PlacedHold:
        key = v.idem_key(cmd.key)
        v.positive_points(cmd.points)
        timeout = v.hold_timeout(cmd.timeout, self.policy.hold_timeout, self.policy.hold_max_timeout)
        cmd = c.PlaceHold(key, v.member_id(cmd.member_id), v.unit(cmd.unit, self.policy.units), cmd.points,
                          cmd.timeout, v.optional_text(cmd.reference, "reference"),
                          v.screening_context(cmd.context, self.clock.now()))  # fmt: skip
        await self._require_exists(cmd.member_id)
        screened: list[Screening | None] = [None]

        async def precheck() -> None:
            await self._active(cmd.member_id)()
            screened[0] = await self._screen_spend("hold", cmd.key, cmd.member_id, cmd.unit, cmd.points, None,
                                                   cmd.context)  # fmt: skip

        def body(b: ShardBook) -> PlacedHold:
            return hold_or_review(b, cmd, screened[0], timeout=timeout, review_timeout=self.policy.hold_max_timeout)

        placed = await self._mutate(cmd, self.shard_of(cmd.member_id), PlacedHold, body, precheck)
        decided = await self._decided(placed.hold)
        if decided is None:
            return placed
        hold, captured = decided
        return replace(placed, hold=hold, capture_transaction_id=captured.transaction_id if captured else "")

    async def capture_hold(self, cmd: c.CaptureHold) -> HoldResult:
        v.idem_key(cmd.key)
        v.object_id(cmd.hold_id, "h", "hold_id")
        if cmd.points < 0:
            raise InvalidArgument(f"must be zero (all) or positive, got {cmd.points}", field="points")
        shard = self.shard_of_id(cmd.hold_id)

        async def precheck() -> None:
            """A capture spends, as a redemption does: not for a member blocked or erased since
            the hold was placed (voiding it still gives the points back). A hold a review or a
            transfer owns is its owner's to capture, which checks the member itself."""
            hold = await self.store.read(shard, lambda tx: tx.get_hold(cmd.hold_id))
            if hold is not None and hold.status is HoldStatus.PLACED and not hold.saga_id:
                await self._require_active(hold.member_id, field="hold_id")

        return await self._mutate(cmd, shard, HoldResult, lambda b: b.capture_hold(cmd.hold_id, cmd.points), precheck)

    async def void_hold(self, cmd: c.VoidHold) -> HoldResult:
        v.idem_key(cmd.key)
        v.object_id(cmd.hold_id, "h", "hold_id")
        return await self._mutate(cmd, self.shard_of_id(cmd.hold_id), HoldResult, lambda b: b.void_hold(cmd.hold_id))

    async def get_hold(self, hold_id: str) -> Hold:
        v.object_id(hold_id, "h", "hold_id")
        return await self.store.read(
            self.shard_of_id(hold_id),
            lambda tx: ShardBook(tx, self.clock.now(), self.policy).require_hold(hold_id),
        )

    def _check_reverse(self, cmd: c.Reverse) -> c.Reverse:
        v.idem_key(cmd.key)
        v.object_id(cmd.transaction_id, "tx", "transaction_id")
        v.optional_text(cmd.reason, "reason")
        chosen = sum([cmd.points is not None, cmd.refund is not None, cmd.full])
        if chosen != 1:
            raise InvalidArgument("set exactly one of points, refund_amount or full", field="amount")
        if cmd.points is not None:
            v.positive_points(cmd.points)
        if cmd.refund is not None:
            v.money(cmd.refund, "refund_amount")
        return cmd

    async def reverse(self, cmd: c.Reverse) -> ReverseResult:
        cmd = self._check_reverse(cmd)
        shard = self.shard_of_id(cmd.transaction_id)
        owner = await self._merged_owner(cmd.transaction_id)
        if owner is None:
            return await self._mutate(cmd, shard, ReverseResult, lambda b: self.reverse_body(b, cmd))
        gone, target = owner.member_id, await self.merge_heir(owner, "transaction_id")

        def body(b: ShardBook) -> ReverseResult | str:
            """Decided in the write, so a review decided meanwhile cannot strand the points: a late
            review's credit still pending on its own member is reversed there; otherwise the
            points live with the target now, and a two-shard saga takes them, like a transfer."""
            if credit_still_here(b.tx, cmd.transaction_id, gone):
                return self.reverse_body(b, cmd)
            # Reversed whole, its capped points go back to the caps the target keeps (untier).
            whole = b.reverses_whole(cmd.transaction_id, cmd.points, cmd.refund)
            return b.start_merged_reversal(
                cmd.transaction_id,
                points=cmd.points,
                refund=cmd.refund,
                reason=cmd.reason,
                target=target,
                saga_id=new_id("rv", gone),
                caps=capped_unreturned(b.tx, cmd.transaction_id) if whole else None,
            )

        # A replay answers from what the first call stored, whichever path it took.
        done: object = await self._mutate(cmd, shard, object, body)
        if isinstance(done, str):
            return await self.sagas.drive_reversal(done)
        return done if isinstance(done, ReverseResult) else codec.from_plain(ReverseResult, done)

    @staticmethod
    def reverse_body(b: ShardBook, cmd: c.Reverse) -> ReverseResult:
        """A reversal of an earn on its own shard, over any transport: the points, and the tier
        credits off the month they qualified in."""
        result = b.reverse(cmd.transaction_id, points=cmd.points, refund=cmd.refund, reason=cmd.reason)
        untier(b, cmd.transaction_id, result.reversed_points)
        return result

    async def release_pending(self, cmd: c.ReleasePending) -> Transaction:
        v.idem_key(cmd.key)
        v.object_id(cmd.transaction_id, "tx", "transaction_id")
        shard = self.shard_of_id(cmd.transaction_id)
        owner = await self._merged_owner(cmd.transaction_id)
        if owner is not None:
            # The pending lot moved with the merge; it still carries this earn's id.
            replayed = await self._stored_result(cmd.key, c.fingerprint(cmd), shard, Transaction)
            if replayed is not None:
                return replayed
            if await self.store.read(shard, lambda tx: credit_still_here(tx, cmd.transaction_id, owner.member_id)):
                # A late review's credit waits on the merged-away member for the decision (Merge in
                # docs/ledger.md): refused around an open review as for any member, and what a
                # release frees goes on to the heir.
                released = await self._mutate(
                    cmd, shard, Transaction, lambda b: reviews.release_unreviewed(b, cmd.transaction_id)
                )
                await self.sagas.follow_merge(owner.member_id)
                return released
            target = await self.merge_heir(owner, "transaction_id")
            return await self._mutate(
                cmd, self.shard_of(target), Transaction, lambda b: b.release_moved_pending(cmd.transaction_id, target)
            )
        return await self._mutate(cmd, shard, Transaction, lambda b: reviews.release_unreviewed(b, cmd.transaction_id))

    # Transfers ---------------------------------------------------------------------------

    async def transfer(self, cmd: c.Transfer) -> TransferResult:
        """Screened like a redemption (points leave the member): DENY refuses it, REVIEW
        reserves the points in a hold and opens a review whose approval completes it."""
        key = v.idem_key(cmd.key)
        v.positive_points(cmd.points)
        cmd = replace(cmd, key=key, source_member_id=v.member_id(cmd.source_member_id, "source_member_id"),
                      destination_member_id=v.member_id(cmd.destination_member_id, "destination_member_id"),
                      unit=v.unit(cmd.unit, self.policy.units), reason=v.optional_text(cmd.reason, "reason"),
                      context=v.screening_context(cmd.context, self.clock.now()))  # fmt: skip
        if cmd.source_member_id == cmd.destination_member_id:
            raise InvalidArgument("source and destination are the same member", field="destination_member_id")
        await self._require_exists(cmd.source_member_id, "source_member_id")
        await self._require_exists(cmd.destination_member_id, "destination_member_id")
        screened: list[Screening | None] = [None]

        async def precheck() -> None:
            await self._require_active(cmd.source_member_id, "source_member_id")
            await self._require_active(cmd.destination_member_id, "destination_member_id")
            screened[0] = await self._screen_spend(
                "transfer", cmd.key, cmd.source_member_id, cmd.unit, cmd.points, None, cmd.context,
                kind=ScreenedKind.TRANSFER, counterparty=cmd.destination_member_id,
            )  # fmt: skip

        src_shard = self.shard_of(cmd.source_member_id)
        same_shard = self.store.multi_member_units and src_shard == self.shard_of(cmd.destination_member_id)
        if same_shard:
            result = await self._mutate(
                cmd, src_shard, TransferResult, lambda b: self.sagas.same_shard_transfer(b, cmd, screened[0]), precheck
            )
        else:
            # Cross-shard: step 1 reserves on the source and records the saga, idempotently.
            saga_id = await self._mutate(
                cmd, src_shard, str, lambda b: self.sagas.start_transfer(b, cmd, screened[0]), precheck
            )
            self._fault("transfer_after_hold")
            result = TransferResult(saga_id, None, None, None, screened[0])
        if result.debit is None:  # on its way, or held by a review: where it stands now
            now = await self.sagas.transfer_outcome(result.transfer_id)
            result = replace(now, screening=now.screening or result.screening)
        unscored = screened[0] is not None and not screened[0].scored
        if unscored and result.debit is not None and same_shard:
            # Decided without fraud_svc (away, or the balance looked short) and moved in one
            # write: tell it now, under the screening's event id, so its velocity state holds
            # the transfer once. (A saga does so when it completes; a replay screens nothing.)
            await self.observe_transfer(screening_event_id("transfer", cmd.key.namespace, cmd.key.key),
                                        cmd.source_member_id, cmd.destination_member_id, cmd.points,
                                        result.debit.recorded_at)  # fmt: skip
        return result

    async def observe_transfer(self, event_id: str, source: str, destination: str, points: int, at: datetime) -> None:
        """A transfer that moved without a score, told to fraud_svc for its velocity state."""
        await self._observe(ScreenedKind.TRANSFER, event_id, source, points, None, counterparty=destination, at=at)

    async def _observe(self, kind: ScreenedKind, event_id: str, member_id: str, points: int, amount: Money | None,
                       *, counterparty: str = "", context: ScreeningContext | None = None,
                       at: datetime | None = None) -> None:  # fmt: skip
        """A committed transfer or return, told to fraud_svc for its velocity state."""
        if self.fraud is None:
            return
        try:
            await self.fraud.observe(ScreeningRequest(
                event_id=event_id, kind=kind, member_id=member_id, occurred_at=at or self.clock.now(),
                context=context or ScreeningContext(), points=points, amount=amount, balance_points=0,
                member_since=await self.member_since(member_id), counterparty_member_id=counterparty,
            ))  # fmt: skip
        except Exception:  # the transfer or return has committed: its caller must hear so
            log.exception("could not tell fraud_svc about %s %s", kind, event_id)

    async def recover_sagas(self, *, at_startup: bool = False) -> int:
        """Completes transfers, merges and reversals a crash left half-way (sagas.py)."""
        return await self.sagas.recover(at_startup=at_startup)

    # Reads -------------------------------------------------------------------------------

    async def get_balance(self, member_id: str, unit: str) -> Balance:
        v.member_id(member_id)
        unit = v.unit(unit, self.policy.units)
        await self._require_exists(member_id)
        if self.cache is not None and self.cache.usable_for(member_id, unit):
            cached = await self.cache.get(member_id, unit)
            if cached is not None:
                return cached
        balance = await self.stored_balance(member_id, unit)
        if self.cache is not None and self.cache.usable_for(member_id, unit):
            await self.cache.fill(balance)
        return balance

    async def stored_balance(self, member_id: str, unit: str) -> Balance:
        """The balance as the store has it, never the cache: what spending decides on."""
        return await self.store.read(
            self.shard_of(member_id),
            lambda tx: ShardBook(tx, self.clock.now(), self.policy).balance(member_id, unit),
        )

    async def spendable_balance(self, member_id: str, unit: str) -> Balance:
        """The balance a debit now would find (GetBalance for_spending): what a quote promises
        is then what a redemption pays."""
        v.member_id(member_id)
        unit = v.unit(unit, self.policy.units)
        await self._require_active(member_id)
        return await self.store.read(
            self.shard_of(member_id),
            lambda tx: ShardBook(tx, self.clock.now(), self.policy).spendable_balance(member_id, unit),
        )

    async def list_entries(self, member_id: str, unit: str, page_size: int, page_token: str) -> Page:
        v.member_id(member_id)
        unit = v.unit(unit, self.policy.units)
        size = v.page_size(page_size)
        account = member_account(member_id, unit)
        before = _decode_token(page_token, account)
        await self._require_exists(member_id)
        rows = await self.store.read(self.shard_of(member_id), lambda tx: tx.list_entries(account, before, size + 1))
        token = f"e{rows[size - 1].entry_id}.{_token_tag(account)}" if len(rows) > size else ""
        return Page(rows[:size], token)

    # Time-driven jobs --------------------------------------------------------------------

    async def run_maintenance(self) -> MaintenanceReport:
        expired = lots = released = voided = 0
        for shard in range(self.store.shard_count):
            # Credits due for release and holds past their timeout first: a timed-out hold no
            # longer protects the points it reserved, and a released credit past its expiry
            # expires in this same pass, so one pass leaves nothing due.
            released += await self._all_pages(shard, ShardBook.release_due)
            voided += await self._all_pages(shard, ShardBook.void_due_holds)
            page: tuple[int, int, object] = (0, 0, None)
            while True:  # every due lot, a page a write: lots held by a hold do not hide the rest
                after = page[2]
                page = await self._book(shard, lambda b: b.expire_due(self.expiry_page, after))  # noqa: B023 (awaited here)
                expired, lots = expired + page[0], lots + page[1]
                if page[2] is None:
                    break
        sagas = await self.recover_sagas()
        purchases = await self.accrual.process_waiting()
        if self.fraud is not None:
            await self.fraud.tell_backlog()  # what fraud_svc missed while it was away
        tiers = await look_at_due_tiers(self.accrual)  # after the sagas: a merge's months are in
        return MaintenanceReport(expired, lots, released, voided, sagas, purchases, tiers)

    async def _all_pages(self, shard: int, step: Callable[[ShardBook, int], int]) -> int:
        """Runs a job step page by page until a page comes back short, so one pass leaves no
        due hold still reserving points (nor a due credit pending); bounded, in case a page
        repeats. Returns how many items the pages handled."""
        done = 0
        for _ in range(MAINTENANCE_PAGES):
            n = await self._book(shard, lambda b: step(b, self.maintenance_page))
            done += n
            if n < self.maintenance_page:
                break
        return done

    async def totals(self, *, fresh: bool = False) -> tuple[datetime, ReconcileReport]:
        """A fresh pass, or one at most TOTALS_MAX_AGE old (a back-office page refreshing)."""
        now = self.clock.now()
        cached = self._totals
        if fresh or cached is None or abs(now - cached[0]) > TOTALS_MAX_AGE:
            cached = self._totals = (now, await reconcile(self.store, now))
        return cached

    async def void_overdue_hold(self, shard: int, hold_id: str) -> bool:
        """Reconciliation's backstop to the hold timer; False if the hold settled meanwhile."""

        def void(book: ShardBook) -> bool:
            hold = book.tx.get_hold(hold_id)
            if hold is None or hold.status != HoldStatus.PLACED or hold.expires_at > book.now:
                return False
            book.void_hold(hold_id, expired=True)
            return True

        return await self._book(shard, void)

    async def purge_expired_keys(self, retention: timedelta) -> int:
        """Deletes what retention no longer keeps, a slice per unit of work, so postings served
        meanwhile wait for one slice at most."""
        cutoff = self.clock.now() - retention
        purged = 0
        while True:
            n = await self.store.write_directory(lambda d: d.purge_claims_before(cutoff, PURGE_SLICE))
            purged += n
            if n < PURGE_SLICE:
                break
        for shard in range(self.store.shard_count):
            resume = ""
            while True:
                n, resume = await self.store.write(shard, functools.partial(_purge_slice, cutoff, resume))
                purged += n
                if not resume:
                    break
        return purged

    # Batch ingest ------------------------------------------------------------------------

    async def ingest(self, items: Sequence[c.PostingCommand | c.RecordPurchase | LedgerError]) -> list[Any]:
        """Posts a batch; per item either (result, replayed) or the LedgerError it failed with.
        Purchases take the batch accrual path, the other postings the batch posting path."""
        from ledger_svc.batch_accrual import BatchAccrual
        from ledger_svc.ingest import BatchIngest

        results: list[Any] = []
        owners = await self._reversal_owners(items)
        for segment in _in_member_order(items, owners):
            purchases = [i for i, item in enumerate(segment) if isinstance(item, c.RecordPurchase)]
            if not purchases:
                results += await BatchIngest(self, owners).run(segment)  # type: ignore[arg-type]
                continue
            others = [i for i, item in enumerate(segment) if not isinstance(item, c.RecordPurchase)]
            bought, posted = await asyncio.gather(
                BatchAccrual(self.accrual).run([segment[i] for i in purchases]),  # type: ignore[misc]
                BatchIngest(self, owners).run([segment[i] for i in others]),  # type: ignore[misc]
            )
            done: list[Any] = [None] * len(segment)
            for i, outcome in [*zip(purchases, bought, strict=True), *zip(others, posted, strict=True)]:
                done[i] = outcome
            results += done
        return results


MEMBER_CACHE_LIMIT = 400_000
# At most this many pages of due pending credits (or holds) in one maintenance pass.
MAINTENANCE_PAGES = 200
# How long one replica trusts a member's status or profile it read (see _MemberCache).
MEMBER_CACHE_SECONDS = 2.0
V = TypeVar("V")


def _in_member_order(items: Sequence[Any], owners: dict[str, ReversalOwner]) -> list[Sequence[Any]]:
    """The batch cut where a member's items switch between purchases and other postings.
    Purchases and postings run side by side (a purchase waits for rules_svc and fraud_svc, a
    posting does not), so a redemption after the purchase that earns its points would otherwise
    be written first and refused, and a reversal of a tier-credit earn would price the purchase
    ahead of it at the lower tier. Segments run one after another; a batch of one kind is one.
    `owners`: whose points each reversal takes back (by transaction id)."""
    segments: list[Sequence[Any]] = []
    start = 0
    kinds: dict[str, bool] = {}  # member -> whether its items in the current segment are purchases
    for i, item in enumerate(items):
        taken = owners.get(getattr(item, "transaction_id", ""))
        member = getattr(item, "member_id", "") or (taken.taken_from if taken else "")
        if not member:
            continue
        buying = isinstance(item, c.RecordPurchase)
        if kinds.setdefault(member, buying) != buying:
            segments.append(items[start:i])
            start, kinds = i, {member: buying}
    segments.append(items[start:])
    return [s for s in segments if s]


def _purge_slice(cutoff: datetime, resume: str, tx: ShardTx) -> tuple[int, str]:
    return tx.purge_before(cutoff, cutoff, resume)


class _MemberCache(Generic[V]):
    """Member status and profile as this process last read them, for MEMBER_CACHE_SECONDS.

    Several ledger replicas share one store, and a block, merge or erasure made through one of
    them must reach the others' checks: an entry older than that is read again, so it does
    within MEMBER_CACHE_SECONDS (and a read that raced a block is not trusted for longer).
    Bounded: when full, the oldest tenth goes (a dict keeps insertion order), so a member
    population larger than the limit costs a miss now and then, not a miss on every call."""

    def __init__(self, limit: int = MEMBER_CACHE_LIMIT, seconds: float = MEMBER_CACHE_SECONDS) -> None:
        self._entries: dict[str, tuple[float, V]] = {}
        self.limit, self.seconds = limit, seconds

    def get(self, key: str) -> V | None:
        found = self._entries.get(key)
        if found is None or found[0] < time.monotonic():
            return None
        return found[1]

    def put(self, key: str, value: V) -> None:
        entries = self._entries
        entries.pop(key, None)  # to the end: its age is the insertion order
        if len(entries) >= self.limit:
            for old in list(itertools.islice(entries, max(1, self.limit // 10))):
                del entries[old]
        entries[key] = (time.monotonic() + self.seconds, value)

    def pop(self, key: str) -> None:
        self._entries.pop(key, None)

    def clear(self) -> None:
        self._entries.clear()


def _review_cursor(token: str) -> tuple[datetime, str] | None:
    if not token:
        return None
    when, _, review_id = token.partition("|")
    try:
        return utc_instant(datetime.fromisoformat(when)), v.object_id(review_id, "rv", "page_token")
    except (ValueError, InvalidArgument):
        raise InvalidArgument("is not a token this API returned", field="page_token") from None


def _token_tag(account: str) -> str:
    """Ties a history token to the listing that issued it: another member's or unit's token
    would start that listing at a foreign entry id, skipping entries with no error."""
    return hashlib.sha256(account.encode()).hexdigest()[:8]


def _decode_token(token: str, account: str) -> int:
    if not token:
        return 2**62
    digits, dot, tag = token[1:].partition(".")  # tokens issued before 2026-12-07 carry no tag
    if not token.startswith("e") or not (digits.isascii() and digits.isdigit() and len(digits) <= 18):
        raise InvalidArgument("is not a token this API returned", field="page.page_token")
    if dot and tag != _token_tag(account):
        raise InvalidArgument("is a token of another member's or unit's history", field="page.page_token")
    return int(digits)
