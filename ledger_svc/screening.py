"""Fraud screening of purchases and redemptions, and what happens when it cannot be had.

The ledger asks fraud_svc once per purchase or redemption, after the idempotency replay check
(a retry never scores twice) and before the posting. fraud_svc answers allow, review or deny;
the ledger acts on it (purchases.py, reviews.py). When fraud_svc is down or slower than the
deadline, a per-operation policy decides instead and the screening records `scored=False`,
so ops can find every posting made without a score. Defaults: purchases fail open (points
earn), redemptions of at least `large_redeem_points` fail closed to review (points are held
until ops decides), smaller redemptions fail open.
"""

from __future__ import annotations

import enum
import hashlib
import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from redis.asyncio import Redis
from redis.exceptions import RedisError

from ledger_svc import codec
from ledger_svc.domain import FailedPrecondition, Money

log = logging.getLogger(__name__)
BREAKER_SECONDS = 1.0


class Verdict(enum.StrEnum):
    ALLOW = "ALLOW"
    REVIEW = "REVIEW"
    DENY = "DENY"


class ScreenedKind(enum.StrEnum):
    PURCHASE = "PURCHASE"
    REDEMPTION = "REDEMPTION"
    # Observed only: fraud_svc records them in its velocity state (transfer rings, return
    # abuse), so the redemption that cashes them in is scored knowing they happened.
    TRANSFER = "TRANSFER"
    RETURN = "RETURN"


@dataclass(frozen=True, slots=True)
class ScreeningContext:
    """Session facts a channel knows and the ledger does not keep (see ledger.proto)."""

    channel: str = ""
    store_id: str = ""
    device_id: str = ""
    ip: str = ""
    card_hash: str = ""
    employee_card: str = ""
    contact_changed_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class Screening:
    verdict: Verdict
    scored: bool
    score: float = 0.0
    reasons: tuple[str, ...] = ()
    model_version: str = ""
    review_id: str = ""

    @property
    def why(self) -> str:
        return ", ".join(self.reasons) or "no reason given"


@dataclass(frozen=True, slots=True)
class ScreeningRequest:
    """One transaction as fraud_svc scores it; event_id makes a re-score not count twice."""

    event_id: str
    kind: ScreenedKind
    member_id: str
    occurred_at: datetime
    context: ScreeningContext
    points: int
    amount: Money | None
    balance_points: int
    member_since: datetime | None
    counterparty_member_id: str = ""  # a transfer's other member


class ScreenerUnavailable(Exception):
    """fraud_svc did not answer within the deadline (or is down). `outage`: the failure is
    fraud_svc's whatever it is asked (down, too slow, overloaded, no model loaded), not the
    request's (an internal error on this one, an answer that does not fit)."""

    def __init__(self, message: str, *, outage: bool = False) -> None:
        super().__init__(message)
        self.outage = outage


class ScreenerRefused(ScreenerUnavailable):
    """fraud_svc answered, refusing this one request as invalid: the policy decides for it
    alone, and fraud_svc stays in use for everyone else (no breaker)."""


MAX_EVENT_ID = 128  # fraud_svc's bound on an event id


def event_id(*parts: str) -> str:
    """The id fraud_svc counts a transaction under, `what:namespace:key`; a long one (a
    caller's 200-character idempotency key) is replaced by its digest, so it is always scored.
    Every part but the last has '%' and ':' percent-escaped (gateway namespaces are
    `channel:key_id`), so ('pos:k1', 'abc') and ('pos', 'k1:abc') are two ids; the key, last,
    keeps its colons, and a part without either character reads as before."""
    *head, last = parts
    text = ":".join((*(p.replace("%", "%25").replace(":", "%3A") for p in head), last))
    if len(text) <= MAX_EVENT_ID:
        return text
    return f"{parts[0]}:sha256:{hashlib.sha256(text.encode()).hexdigest()}"


class Screener(Protocol):
    async def screen(self, request: ScreeningRequest) -> Screening: ...

    async def screen_many(self, requests: Sequence[ScreeningRequest]) -> list[Screening | ScreenerUnavailable]: ...


class FraudDenied(FailedPrecondition):
    """fraud_svc denied spending points (a redemption, hold or transfer); the reason codes say why."""

    code = "FRAUD_DENIED"

    def __init__(self, screening: Screening, field: str = "member_id") -> None:
        super().__init__(
            f"refused by fraud screening: {screening.why}",
            field=field,
            metadata={"reasons": ",".join(screening.reasons), "scored": str(screening.scored).lower()},
        )
        self.screening = screening


@dataclass(frozen=True, slots=True)
class UnavailablePolicy:
    """What stands in for a verdict when fraud_svc cannot give one, per operation."""

    purchase: Verdict = Verdict.ALLOW
    redemption: Verdict = Verdict.ALLOW
    large_redemption: Verdict = Verdict.REVIEW
    large_redeem_points: int = 5_000

    def verdict_for(self, request: ScreeningRequest) -> Verdict:
        if request.kind is ScreenedKind.PURCHASE:
            return self.purchase
        return self.large_redemption if request.points >= self.large_redeem_points else self.redemption


MAX_TELL_ATTEMPTS = 20  # a backlog entry fraud_svc keeps failing on is dropped (logged) after this many


@dataclass(frozen=True, slots=True)
class BacklogEntry:
    """One kept observation and how many times fraud_svc has failed on it."""

    request: ScreeningRequest
    attempts: int = 0


# KEYS: the backlog list, leases (hash: lease id -> the entries it took, as a JSON array),
# lease deadlines (sorted set, ms). ARGV: count, lease ms, new lease id. Leases past their
# deadline (a replica died mid-pass) go back on the list first; then up to `count` entries move
# from the list to a new lease, in one step, so two replicas never take the same entry.
_TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now)) do
  local held = redis.call('HGET', KEYS[2], id)
  if held then
    local items = cjson.decode(held)
    for i = 1, #items, 500 do redis.call('RPUSH', KEYS[1], unpack(items, i, math.min(i + 499, #items))) end
  end
  redis.call('HDEL', KEYS[2], id)
  redis.call('ZREM', KEYS[3], id)
end
local taken = redis.call('LPOP', KEYS[1], ARGV[1])
if not taken then return {} end
redis.call('HSET', KEYS[2], ARGV[3], cjson.encode(taken))
redis.call('ZADD', KEYS[3], now + tonumber(ARGV[2]), ARGV[3])
return taken
"""

# KEYS as _TAKE. ARGV: lease id, list bound, then the entries to put back. A lease that timed
# out was put back whole already: then nothing is pushed again (no entry twice on the list).
_SETTLE = """
if redis.call('HDEL', KEYS[2], ARGV[1]) == 0 then return 0 end
redis.call('ZREM', KEYS[3], ARGV[1])
if #ARGV > 2 then
  for i = 3, #ARGV, 500 do redis.call('RPUSH', KEYS[1], unpack(ARGV, i, math.min(i + 499, #ARGV))) end
  redis.call('LTRIM', KEYS[1], -tonumber(ARGV[2]), -1)
end
return 1
"""


@dataclass(frozen=True, slots=True)
class BacklogLease:
    """Entries one maintenance pass took; they go back on the backlog when the lease ends
    unsettled (the replica died), so they are told by another pass instead of lost."""

    lease_id: str
    entries: list[BacklogEntry]


class ObservationBacklog:
    """Observations fraud_svc could not be told, in Redis beside its velocity state (which an
    outage of Redis loses as well). Bounded: past `limit`, the oldest go (logged).

    Every ledger replica runs the maintenance pass that drains it. A pass takes a page of
    entries under a lease, atomically (a Lua script), so two replicas never take the same
    entry; it then settles the lease, putting back those it did not tell. A replica that dies
    in between leaves the lease to run out: the next pass of any replica puts its entries back
    and tells them. Order is not kept, and need not be: fraud_svc's velocity state is keyed by
    each event's own time and counts an event id once, so telling observations out of order
    (or twice, as a pass cut off after telling some does) changes nothing."""

    def __init__(
        self, redis: Redis, *, key: str = "pm:ledger:fraud-observations", limit: int = 200_000,
        lease_seconds: float = 300.0,
    ) -> None:  # fmt: skip
        self.redis, self.key, self.limit = redis, key, limit
        self.lease_ms = max(1, int(lease_seconds * 1000))
        self.leases_key = f"{key}:leases"  # entries a pass has taken and not yet settled
        self._keys = [key, self.leases_key, f"{key}:lease-deadlines"]
        self._take = redis.register_script(_TAKE)
        self._settle = redis.register_script(_SETTLE)

    async def keep(self, *requests: ScreeningRequest) -> None:
        if not requests:
            return
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.rpush(self.key, *(codec.dumps(BacklogEntry(r)) for r in requests))
                pipe.ltrim(self.key, -self.limit, -1)
                await pipe.execute()
        except RedisError:
            log.warning("fraud_svc and Redis both away: %d observations (%s of %s first) are lost",
                        len(requests), requests[0].event_id, requests[0].kind)  # fmt: skip

    async def take(self, count: int) -> BacklogLease:
        """Up to `count` entries, moved from the backlog to a lease atomically: the caller owns
        them and settles the lease with the ones it did not tell. An unreadable entry is
        dropped (logged)."""
        lease_id = uuid.uuid4().hex
        try:
            raw: list[bytes | str] = await self._take(keys=self._keys, args=[count, self.lease_ms, lease_id])
        except RedisError:
            return BacklogLease(lease_id, [])
        entries = (_entry_of(item) for item in raw or ())
        return BacklogLease(lease_id, [entry for entry in entries if entry is not None])

    async def settle(self, lease: BacklogLease, back: Sequence[BacklogEntry]) -> None:
        """Ends the lease, putting `back` on the backlog. If Redis cannot be reached now, the
        lease runs out and every entry it took comes back (the told ones are told again)."""
        try:
            await self._settle(keys=self._keys, args=[lease.lease_id, self.limit, *(codec.dumps(e) for e in back)])
        except RedisError:
            log.warning("Redis away: %d fraud observations come back when their lease ends", len(lease.entries))


def _entry_of(item: bytes | str) -> BacklogEntry | None:
    try:
        return codec.loads(BacklogEntry, item.decode() if isinstance(item, bytes) else item)
    except (ValueError, TypeError, KeyError) as exc:
        log.error("dropping an unreadable fraud observation from the backlog: %s", exc)
        return None


class FraudScreen:
    """The screener plus the unavailable policy and a short breaker, so an outage costs one
    deadline per second rather than one per request."""

    def __init__(
        self, screener: Screener, policy: UnavailablePolicy, backlog: ObservationBacklog | None = None
    ) -> None:
        self.screener = screener
        self.policy = policy
        self.backlog = backlog
        self._down_until = 0.0

    async def screen(self, request: ScreeningRequest) -> Screening:
        if self._up():
            try:
                return await self.screener.screen(request)
            except ScreenerRefused:
                return self.unscored(request, "fraud_svc_refused")
            except ScreenerUnavailable as exc:
                self._trip(f"{request.kind} {request.event_id}", exc)
        await self._keep_unscored([request])
        return self.unscored(request)

    async def _keep_unscored(self, requests: Sequence[ScreeningRequest]) -> None:
        """Purchases and spends decided without fraud_svc go to the backlog, told by the
        maintenance pass under their own event ids, so the velocity state the next decisions
        read holds what an outage let through (a scored request is recorded as it is scored).
        Transfers are told once they have moved (`observe`): one refused after this point never
        happened."""
        if self.backlog is not None:
            await self.backlog.keep(*(r for r in requests if r.kind is not ScreenedKind.TRANSFER))

    async def observe(self, request: ScreeningRequest) -> None:
        """Tells fraud_svc about a transaction it does not decide (a transfer, a return), after
        it committed; the answer is not used. With fraud_svc away it goes to the backlog, told
        again by the maintenance pass, so its velocity state misses nothing an outage saw."""
        if await self._told(request) is not True and self.backlog is not None:
            await self.backlog.keep(request)

    async def _told(self, request: ScreeningRequest) -> bool | ScreenerUnavailable:
        """True once fraud_svc has the event (a refusal as invalid counts: telling it again
        would not change that); False if it was not asked (the breaker is open); else the
        failure (an outage's has tripped the breaker)."""
        if not self._up():
            return False
        try:
            await self.screener.screen(request)
        except ScreenerRefused:
            return True
        except ScreenerUnavailable as exc:
            self._trip(f"{request.kind} {request.event_id}", exc)
            return exc
        return True

    async def tell_backlog(self, limit: int = 500) -> int:
        """The maintenance pass: up to `limit` observations kept while fraud_svc was away, taken
        from the backlog at once (so replicas running the pass together each tell their own),
        told until fraud_svc is not there, the rest put back; returns how many were told. Order
        does not matter (see ObservationBacklog). An entry fraud_svc answers with a failure (not
        a refusal as invalid, which counts as told) goes back last, the others told past it;
        after MAX_TELL_ATTEMPTS such failures it is dropped, logged. A failure because fraud_svc was
        not there (down, past the deadline) is the outage's and does not count against it."""
        if self.backlog is None:
            return 0
        lease = await self.backlog.take(limit)
        entries = lease.entries
        told, back, failed = 0, [], []
        for i, entry in enumerate(entries):
            outcome = await self._told(entry.request)
            if outcome is True:
                told += 1
                continue
            if isinstance(outcome, ScreenerUnavailable) and not outcome.outage:  # the entry's, not an outage's
                entry = BacklogEntry(entry.request, entry.attempts + 1)
                if entry.attempts >= MAX_TELL_ATTEMPTS:
                    log.error(
                        "dropping fraud observation %s of %s: fraud_svc failed on it %d times, last: %s",
                        entry.request.event_id, entry.request.kind, entry.attempts, outcome,
                    )  # fmt: skip
                else:
                    failed.append(entry)  # last, so the next pass tries the others first
                continue  # the others are still told
            back.extend(entries[i + 1 :])  # untried (the breaker is open): as they were
            back.append(entry)
            break
        await self.backlog.settle(lease, back + failed)
        return told

    async def screen_many(self, requests: Sequence[ScreeningRequest]) -> list[Screening]:
        """Many in one call, scored in event-time order whatever order they are given in."""
        if not requests:
            return []
        if self._up():
            order = sorted(range(len(requests)), key=lambda i: (requests[i].occurred_at, i))
            try:
                scored = await self.screener.screen_many([requests[i] for i in order])
            except ScreenerUnavailable as exc:
                self._trip(f"{len(requests)} transactions", exc)
            else:
                out: list[Screening] = [Screening(Verdict.ALLOW, False)] * len(requests)
                missed: list[ScreeningRequest] = []
                for i, got in zip(order, scored, strict=True):
                    if isinstance(got, ScreenerRefused):
                        out[i] = self.unscored(requests[i], "fraud_svc_refused")
                    elif isinstance(got, ScreenerUnavailable):
                        out[i] = self.unscored(requests[i])
                        missed.append(requests[i])
                    else:
                        out[i] = got
                await self._keep_unscored(missed)
                return out
        await self._keep_unscored(requests)
        return [self.unscored(r) for r in requests]

    def _up(self) -> bool:
        return time.monotonic() >= self._down_until

    def _trip(self, what: str, why: ScreenerUnavailable) -> None:
        """Opens the breaker on an outage only: a failure of one request (an internal error on
        that basket) leaves the next ones scored, a blocked device's spend included, instead of
        handing a second of them to the policy."""
        if not why.outage:
            log.warning("fraud_svc failed on %s (not an outage); decided by policy: %s", what, why)
            return
        log.warning("fraud_svc unavailable; %s decided by policy: %s", what, why)
        self._down_until = time.monotonic() + BREAKER_SECONDS

    def unscored(self, request: ScreeningRequest, why: str = "fraud_svc_unavailable") -> Screening:
        """What the per-operation policy decides when no score is had, and why (recorded)."""
        verdict = self.policy.verdict_for(request)
        return Screening(verdict, scored=False, reasons=(f"unscored:{why}:{verdict.value.lower()}",))
