"""One rule of a program turned into what evaluation needs: checks as closures, sets for the
line conditions, integer multipliers, the guard template. Done once per program version."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, time, timedelta
from fractions import Fraction

from pointmesh.currencies import format_minor
from pointmesh.guards import Guard
from rules_svc.domain import MemberContext
from rules_svc.program import DAYS, MultiplierScope, Rule

PlaceCheck = Callable[[str, str, str, datetime], bool]
MemberCheck = Callable[[MemberContext, int], bool]

MULTIPLY_LINES, MULTIPLY_BASKET, BONUS, BONUS_PER_ITEM = range(4)


def _hhmm(text: str) -> time:
    hours, minutes = text.split(":")
    return time(int(hours), int(minutes))


@dataclass(slots=True, eq=False)
class CompiledRule:
    """Compared and hashed by identity: evaluation keeps sets of the rules a basket could satisfy."""

    rule: Rule
    rule_id: str
    unit: str
    priority: int
    group: str | None
    place_checks: list[PlaceCheck]
    member_checks: list[MemberCheck]
    # Line conditions: the lines must match these; `shortcut` (a line field, "category" or "sku",
    # and its values) lets a basket skip the rule without looking at it when none of its lines
    # has one of those values, so none could qualify.
    categories: frozenset[str] | None
    skus: frozenset[str] | None
    shortcut: tuple[str, frozenset[str]] | None
    line_min: tuple[str, int] | None
    basket_min: tuple[str, int] | None
    matched: tuple[str, ...]
    kind: int
    extra_num: int
    extra_den: int
    compound: bool
    bonus: int
    multiplier_text: str
    per_line_cap: int | None
    per_receipt_cap: int | None
    guard: Guard | None
    day_cap: int | None
    # A window past midnight ("22:00-02:00"): times before this belong to the night that opened
    # the day before, for the day of week and for a day cap alike.
    night_until: time | None = None
    # Precomputed so evaluation does not re-derive them per basket: whether the rule has no line
    # conditions (every line qualifies), and a fixed bonus's explanation.
    every_line: bool = False
    bonus_detail: str = ""

    def guard_for(self, local: datetime) -> Guard | None:
        """Day caps count per store-local day (a night window's night counts as the day it
        opened), so the key carries that date."""
        if self.day_cap is None or self.guard is None:
            return self.guard
        g = self.guard
        day = local.date() - timedelta(days=1) if self.night_until and local.time() < self.night_until else local.date()
        return Guard(f"{self.rule_id}:day:{day.isoformat()}", self.day_cap, g.ordinal_equals, g.ordinal_every)


def _date_check(start: datetime | None, end: datetime | None) -> PlaceCheck:
    local = (start or end).tzinfo is None  # type: ignore[union-attr]

    def check(ch: str, st: str, rg: str, lt: datetime) -> bool:
        at = lt.replace(tzinfo=None) if local else lt
        return (start is None or at >= start) and (end is None or at < end)

    return check


def _place_checks(rule: Rule, matched: list[str]) -> list[PlaceCheck]:
    w = rule.when
    place: list[PlaceCheck] = []
    if w.channels is not None:
        channels = frozenset(w.channels)
        place.append(lambda ch, st, rg, lt: ch in channels)
        matched.append(f"channel in {sorted(channels)}")
    if w.stores is not None:
        stores = frozenset(w.stores)
        place.append(lambda ch, st, rg, lt: st in stores)
        matched.append(f"store in {sorted(stores)}")
    if w.regions is not None:
        regions = frozenset(w.regions)
        place.append(lambda ch, st, rg, lt: rg in regions)
        matched.append(f"region in {sorted(regions)}")
    if w.days_of_week is not None:
        days = frozenset(DAYS.index(d.value) for d in w.days_of_week)
        until = _night_until(rule)
        if until is not None:
            # A night window belongs to the day it opened: "fri 22:00-02:00" is Friday night,
            # so Saturday 01:00 counts as Friday.
            place.append(lambda ch, st, rg, lt: (lt.weekday() - (lt.time() < until)) % 7 in days)
            matched.append(f"store-local night starting on a day in {[d.value for d in w.days_of_week]}")
        else:
            place.append(lambda ch, st, rg, lt: lt.weekday() in days)
            matched.append(f"store-local day in {[d.value for d in w.days_of_week]}")
    if w.time_window is not None:
        start, end = _hhmm(w.time_window.start), _hhmm(w.time_window.end)
        if start < end:
            place.append(lambda ch, st, rg, lt: start <= lt.time() < end)
        else:
            place.append(lambda ch, st, rg, lt: lt.time() >= start or lt.time() < end)
        matched.append(f"store-local time in {w.time_window.start}-{w.time_window.end}")
    if w.date_range is not None:
        place.append(_date_check(w.date_range.start, w.date_range.end))
        matched.append(f"campaign {w.date_range.start or '...'} to {w.date_range.end or '...'}")
    return place


def _member_checks(rule: Rule, matched: list[str]) -> list[MemberCheck]:
    w = rule.when
    member: list[MemberCheck] = []
    if w.tiers is not None:
        tiers = frozenset(w.tiers)
        member.append(lambda m, n: m.tier in tiers)
        matched.append(f"tier in {sorted(tiers)}")
    if w.segments is not None:
        segments = frozenset(w.segments)
        member.append(lambda m, n: not segments.isdisjoint(m.segments))
        matched.append(f"segment in {sorted(segments)}")
    if w.attributes:
        wanted = dict(w.attributes)
        member.append(lambda m, n: all(m.attributes.get(k) == val for k, val in wanted.items()))
        matched.append(f"attributes {wanted}")
    ordinal = w.purchase_number
    if ordinal is not None:
        probe = Guard(ordinal_equals=ordinal.equals or 0, ordinal_every=ordinal.every or 0)
        member.append(lambda m, n: probe.holds_for(n))
        matched.append(f"purchase number {ordinal.equals}" if ordinal.equals else f"every {ordinal.every}th purchase")
    return member


def _guard(rule: Rule) -> tuple[Guard | None, int | None]:
    """The member-state guard template; a day cap's key gets its date at evaluation."""
    ordinal = rule.when.purchase_number
    eq, every = (ordinal.equals or 0, ordinal.every or 0) if ordinal else (0, 0)
    caps = rule.caps
    if caps.per_member_per_day is not None:
        return Guard("", caps.per_member_per_day, eq, every), caps.per_member_per_day
    if caps.per_member_per_campaign is not None:
        start = rule.when.date_range.start if rule.when.date_range else None
        # The campaign's start is part of the key: reusing a rule id for a later campaign starts afresh.
        # Without a start the counter is "always": every run of the rule id shares it, and a
        # running campaign republished keeps what its members used (a start added later would
        # name a new counter, resetting their caps mid-campaign).
        since = start.isoformat() if start else "always"
        return Guard(f"{rule.id}:campaign:{since}", caps.per_member_per_campaign, eq, every), None
    if ordinal is not None:
        return Guard(ordinal_equals=eq, ordinal_every=every), None
    return None, None


def compile_rule(rule: Rule) -> CompiledRule:
    w = rule.when
    matched: list[str] = []
    place = _place_checks(rule, matched)
    member = _member_checks(rule, matched)
    categories = frozenset(w.categories) if w.categories is not None else None
    skus = frozenset(w.skus) if w.skus is not None else None
    shortcut: tuple[str, frozenset[str]] | None = None
    if categories is not None:
        matched.append(f"category in {sorted(categories)}")
        shortcut = ("category", categories)
    if skus is not None:
        matched.append(f"sku in {sorted(skus)}")
        # Both conditions must hold on one line; one of the skus is then a necessary condition.
        shortcut = ("sku", skus)
    basket_min = (
        (w.basket_total_at_least.currency, w.basket_total_at_least.amount_minor) if w.basket_total_at_least else None
    )
    if basket_min:
        matched.append(f"basket total at least {format_minor(basket_min[1], basket_min[0])}")
    line_min = (
        (w.line_amount_at_least.currency, w.line_amount_at_least.amount_minor) if w.line_amount_at_least else None
    )
    if line_min:
        matched.append(f"line amount at least {format_minor(line_min[1], line_min[0])}")
    effect = rule.effect
    extra_num, extra_den, kind, bonus = 0, 1, BONUS, 0
    if effect.multiplier is not None:
        extra = Fraction(effect.multiplier) - 1
        extra_num, extra_den = extra.numerator, extra.denominator
        kind = MULTIPLY_BASKET if effect.per == MultiplierScope.BASKET else MULTIPLY_LINES
    elif effect.bonus_points is not None:
        bonus = effect.bonus_points
    else:
        kind, bonus = BONUS_PER_ITEM, effect.bonus_points_per_item or 0
    guard, day_cap = _guard(rule)
    every_line = categories is None and skus is None and line_min is None
    return CompiledRule(
        rule, rule.id, rule.unit, rule.priority, rule.group, place, member, categories, skus, shortcut, line_min,
        basket_min, tuple(matched), kind, extra_num, extra_den, effect.compound, bonus, effect.multiplier or "",
        rule.caps.per_line, rule.caps.per_receipt, guard, day_cap, _night_until(rule), every_line,
        f"bonus {bonus} {rule.unit}" if kind == BONUS else "",
    )  # fmt: skip


def _night_until(rule: Rule) -> time | None:
    window = rule.when.time_window
    if window is None or _hhmm(window.end) >= _hhmm(window.start):
        return None
    return _hhmm(window.end)
