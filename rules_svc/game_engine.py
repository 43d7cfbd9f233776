"""Gamification progress as pure arithmetic: one purchase fact in, progress and awards out.

No I/O here: the store (game_store.py) loads a member's progress, calls `apply`, and saves the
result with the awards in one transaction, so a purchase event counts once. Award keys are
deterministic (program, item, member, period), so the reward posted to the ledger under that
key can only ever be paid once, however often an event is delivered.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo

from rules_svc.program import Achievement, Challenge, Distinct, GameMatch, Program, Streak


@dataclass(frozen=True, slots=True)
class PurchaseFact:
    event_id: str
    member_id: str
    purchase_id: str
    channel: str
    store_id: str
    total_minor: int
    currency: str
    receipt_time: datetime
    categories: tuple[str, ...] = ()
    earned: tuple[tuple[str, int], ...] = ()  # points per unit the purchase earned
    experiment_arms: tuple[tuple[str, str], ...] = ()

    def points(self, unit: str) -> int:
        return dict(self.earned).get(unit, 0)


@dataclass(slots=True)
class ItemState:
    """A member's progress on one item (stored as JSON)."""

    seen: list[str] = field(default_factory=list)  # distinct values counted (achievements)
    count: int = 0  # matching purchases (challenges)
    completions: int = 0
    last_completed_us: int = 0
    last_week: int = 0  # week number (Monday ordinal // 7) of the last matching purchase (streaks)
    run: int = 0  # consecutive weeks so far


@dataclass(frozen=True, slots=True)
class Award:
    item_id: str
    name: str
    period: str
    points: int
    unit: str

    def key(self, program: str, member_id: str) -> str:
        return f"{program}:{self.item_id}:{member_id}:{self.period}"


def matches(match: GameMatch, fact: PurchaseFact) -> bool:
    if match.channels and fact.channel not in match.channels:
        return False
    if match.stores and fact.store_id not in match.stores:
        return False
    if match.categories and not set(match.categories) & set(fact.categories):
        return False
    least = match.min_total
    return least is None or (fact.currency == least.currency and fact.total_minor >= least.amount_minor)


def week_of(day: date) -> int:
    """Consecutive integers for consecutive ISO weeks (Monday to Sunday)."""
    return (day - timedelta(days=day.weekday())).toordinal() // 7


def _us(when: datetime) -> int:
    return int(when.timestamp() * 1_000_000)


def _distinct_values(kind: Distinct, fact: PurchaseFact, local_day: date) -> list[str]:
    if kind == Distinct.STORE:
        return [fact.store_id]
    if kind == Distinct.CATEGORY:
        return list(fact.categories)
    if kind == Distinct.CHANNEL:
        return [fact.channel]
    if kind == Distinct.DAY:
        return [local_day.isoformat()]
    return [fact.purchase_id]


def _achievement(item: Achievement, state: ItemState, fact: PurchaseFact, local_day: date) -> Award | None:
    if state.completions:
        return None
    for value in _distinct_values(item.distinct, fact, local_day):
        if value not in state.seen:
            state.seen.append(value)
    if len(state.seen) < item.count:
        return None
    state.completions, state.last_completed_us = 1, _us(fact.receipt_time)
    return Award(item.id, item.name, "once", item.reward.points, item.reward.unit)


def _streak(item: Streak, state: ItemState, fact: PurchaseFact, local_day: date) -> Award | None:
    week = week_of(local_day)
    if week <= state.last_week:
        return None  # this week already counted (or a late receipt from a week gone by)
    state.run = state.run + 1 if week == state.last_week + 1 else 1
    state.last_week = week
    if state.run != item.weeks:
        return None
    state.completions += 1
    state.last_completed_us = _us(fact.receipt_time)
    return Award(item.id, item.name, f"run-{week - item.weeks + 1}", item.reward.points, item.reward.unit)


def _challenge(item: Challenge, state: ItemState, fact: PurchaseFact, joined: bool) -> Award | None:
    if state.completions or not item.starts <= fact.receipt_time < item.ends:
        return None
    if item.opt_in and not joined:
        return None
    state.count += 1
    if state.count < item.purchases:
        return None
    state.completions, state.last_completed_us = 1, _us(fact.receipt_time)
    return Award(item.id, item.name, "once", item.reward.points, item.reward.unit)


def apply(program: Program, states: dict[str, ItemState], joined: set[str], fact: PurchaseFact) -> list[Award]:
    """Advances every item the purchase matches; `states` is updated in place."""
    local_day = fact.receipt_time.astimezone(ZoneInfo(program.default_timezone)).date()
    awards: list[Award | None] = []
    g = program.gamification
    for a in g.achievements:
        if matches(a.match, fact):
            awards.append(_achievement(a, states.setdefault(a.id, ItemState()), fact, local_day))
    for s in g.streaks:
        if matches(s.match, fact):
            awards.append(_streak(s, states.setdefault(s.id, ItemState()), fact, local_day))
    for c in g.challenges:
        if matches(c.match, fact):
            awards.append(_challenge(c, states.setdefault(c.id, ItemState()), fact, c.id in joined))
    return [a for a in awards if a is not None]
