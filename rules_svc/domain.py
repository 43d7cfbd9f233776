"""Values the points engine reads and writes, and its errors. No grpc, no storage."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import NamedTuple

from pointmesh.guards import Guard
from rules_svc.program import Policy, Tiers


class RulesError(Exception):
    """Base of the engine's errors; `field` names the request field at fault, when one is."""

    def __init__(self, message: str, *, field: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class BadRequest(RulesError):
    """The basket or request cannot be evaluated as given."""


class NotFound(RulesError):
    pass


class FailedPrecondition(RulesError):
    pass


class VersionUnreadable(RulesError):
    """A stored version this build cannot validate, most likely published by a newer release
    during a rolling upgrade. Not the basket's fault: the caller should try again later (or
    another replica), never refuse the purchase for good, so this is no FailedPrecondition."""


class Conflict(RulesError):
    """An idempotency key reused with another payload."""


class ProgramRejected(RulesError):
    """A rule set that does not validate; `violations` holds (path, message) for every problem."""

    def __init__(self, violations: list[tuple[str, str]]) -> None:
        first = violations[0] if violations else ("", "invalid program")
        super().__init__(f"program refused: {first[0]}: {first[1]}", field=first[0])
        self.violations = violations


@dataclass(frozen=True, slots=True)
class Line:
    sku: str
    category: str
    quantity: int
    amount_minor: int


@dataclass(frozen=True, slots=True)
class Basket:
    """A receipt: channel and store say where, receipt_time (aware) is the business time."""

    channel: str
    store_id: str
    receipt_id: str
    currency: str
    total_minor: int
    lines: tuple[Line, ...]
    receipt_time: datetime


@dataclass(frozen=True, slots=True)
class MemberContext:
    """What the member is at the receipt time; counters are only a preview input."""

    member_id: str = ""
    tier: str = ""
    segments: tuple[str, ...] = ()
    attributes: dict[str, str] = field(default_factory=dict)
    purchase_count: int = 0
    counters: dict[str, int] | None = None
    qualification: dict[str, int] = field(default_factory=dict)


class Component(NamedTuple):
    """One explained part of an earn: a rule's points on one line (line >= 0) or the basket.

    A NamedTuple rather than a frozen dataclass: a basket yields dozens of these, and tuple
    construction is several times cheaper, which matters at 20,000 baskets a second.
    """

    rule_id: str
    unit: str
    points: int
    line: int
    detail: str
    matched: tuple[str, ...] = ()
    capped: str = ""
    guard: Guard | None = None
    threshold_minor: int = 0
    fixed: bool = False
    # A basket multiplier's lines and the points it multiplied on each: a return of some lines
    # takes back their share, not a share of the whole receipt.
    line_bases: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True, slots=True)
class Excluded:
    rule_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class Evaluation:
    program: str
    version: int
    currency: str
    earn_currency: str
    fx_rate: str
    earn_amounts_minor: tuple[int, ...]
    components: tuple[Component, ...]
    excluded: tuple[Excluded, ...]
    expires_at: datetime | None
    release_at: datetime | None
    local_time: datetime
    policy: Policy
    tiers: Tiers | None
    tier: str = ""
    # (experiment id, arm) for every experiment running at the receipt time.
    experiment_arms: tuple[tuple[str, str], ...] = ()
    # Whether purchase-number conditions took part: the answer depends on the purchase count.
    counts_purchases: bool = False
    # The zone tier qualification months and years are counted in (the program's default).
    tier_timezone: str = "UTC"
    # (currency, minor units): the total in the program's base currency; None without a rate.
    base_total: tuple[str, int] | None = None

    def totals(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for part in self.components:
            out[part.unit] = out.get(part.unit, 0) + part.points
        return out
