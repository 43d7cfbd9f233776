"""Tier qualification arithmetic, shared by rules_svc (the tier a purchase earns under) and the
ledger (the upgrade it applies in the earn's own write).

Qualifying earnings are kept in calendar-month buckets ("2026-11" -> tier credits earned), months
and years of the program's time zone: a New Year's Eve purchase in the evening in New York
counts toward the year it was made in there, not the one UTC had already started.
A level reached in a qualification period holds for the rest of that period and the whole
next one, plus the grace days; so a downgrade happens only at a period end plus grace, and an
upgrade happens on the purchase that crosses the threshold.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import lru_cache
from zoneinfo import ZoneInfo

CALENDAR_YEAR = "calendar_year"
ROLLING_12_MONTHS = "rolling_12_months"
ROLLING_BUCKETS = 13


@dataclass(frozen=True, slots=True)
class TierPolicy:
    metric_unit: str
    window: str
    grace_days: int
    levels: tuple[tuple[str, int], ...]  # (code, threshold), entry level first
    timezone: str = "UTC"  # IANA zone whose months and years qualify (the program's default zone)


@lru_cache(maxsize=64)
def _zone(name: str) -> ZoneInfo:
    return ZoneInfo(name)


# A month bucket's name: four-digit year, two-digit month ("2026-01"), as bucket_of writes it.
MONTH_RE = re.compile(r"[0-9]{4}-(0[1-9]|1[0-2])")


def bucket_of(at: datetime, timezone: str = "UTC") -> str:
    """The month bucket `at` counts in. The year is padded by hand: strftime's %Y writes year 999
    as "999" here, a key that names no month (MONTH_RE) and that no lookup ever reads."""
    local = at.astimezone(_zone(timezone))
    return f"{local.year:04d}-{local.month:02d}"


def first_non_month(buckets: Iterable[str]) -> str | None:
    """The first key (in sorted order, so the same one each time) that is not a month bucket, or
    None. The arithmetic here reads only "YYYY-MM" keys: "2026-1" would count as no credits at
    all, so a caller refuses such a key (naming it) rather than tier the member silently low."""
    return next((key for key in sorted(buckets) if not MONTH_RE.fullmatch(key)), None)


def _month_number(at: datetime) -> int:
    return at.year * 12 + at.month - 1


def _bucket_name(month_number: int) -> str:
    year, month = divmod(month_number, 12)
    return f"{year:04d}-{month + 1:02d}"


def _year_total(buckets: Mapping[str, int], year: int, through_month: int = 12) -> int:
    return sum(buckets.get(f"{year:04d}-{m:02d}", 0) for m in range(1, through_month + 1))


def level_for(levels: Sequence[tuple[str, int]], total: int) -> int:
    """Index of the highest level whose threshold the total reaches."""
    reached = 0
    for i, (_code, threshold) in enumerate(levels):
        if total >= threshold:
            reached = i
    return reached


def effective_level(policy: TierPolicy, buckets: Mapping[str, int], at: datetime) -> int:
    grace = timedelta(days=policy.grace_days)
    zone = _zone(policy.timezone)
    at = at.astimezone(zone)
    if policy.window == ROLLING_12_MONTHS:
        # The current month and the twelve before it: month buckets cannot say on which day a
        # purchase fell, so a purchase counts through the end of the same month a year later
        # (at least twelve full months, never fewer).
        # A level a window reached holds for the grace after that window's last month: the
        # best of the windows ending in every month from the one `grace` ago to this one (not
        # just the two ends, which would skip a short month in between, and a whole one of a
        # grace longer than a month).
        first, last = _month_number((at - grace).astimezone(zone)), _month_number(at)
        months = [buckets.get(_bucket_name(n), 0) for n in range(first - ROLLING_BUCKETS + 1, last + 1)]
        total = sum(months[:ROLLING_BUCKETS])
        best = level_for(policy.levels, total)
        for i in range(ROLLING_BUCKETS, len(months)):
            total += months[i] - months[i - ROLLING_BUCKETS]
            best = max(best, level_for(policy.levels, total))
        return best
    # The current year counts through `at`'s month only: a receipt arriving late is priced at the
    # tier its member had then, not one reached by purchases after it (decision 0008). Within
    # that month the buckets cannot tell before from after.
    # A year's level holds through the next year and the grace after it, so every past year
    # whose hold still covers `at` counts: two years back within a grace, three with a grace of
    # 366 days (2024's level holds until 2027-01-02 then, since 2026 has 365 days).
    year = at.year
    levels = [
        level_for(policy.levels, _year_total(buckets, year, at.month)),
        level_for(policy.levels, _year_total(buckets, year - 1)),
    ]
    held = year - 2
    while held + 2 >= 1 and at - grace < datetime(held + 2, 1, 1, tzinfo=zone):
        levels.append(level_for(policy.levels, _year_total(buckets, held)))
        held -= 1
    return max(levels)


def effective_tier(policy: TierPolicy, buckets: Mapping[str, int], at: datetime) -> str:
    return policy.levels[effective_level(policy, buckets, at)][0]


def same_standing(policy: TierPolicy, earlier: datetime, later: datetime) -> bool:
    """Whether `effective_level` answers alike at both instants for any credits: no month
    start, nor month start plus the grace, of the program's zone falls between them (the only
    instants it can change at). Cheaper than asking it twice."""
    zone, grace = _zone(policy.timezone), timedelta(days=policy.grace_days)
    a, b = earlier.astimezone(zone), later.astimezone(zone)  # the grace counted on local clocks, as there
    return _month_number(a) == _month_number(b) and _month_number((a - grace).astimezone(zone)) == _month_number(
        (b - grace).astimezone(zone)
    )


@dataclass(frozen=True, slots=True)
class TierStanding:
    """Where a member stands, as a member's app shows it: the tier, the credits the current
    qualification window counts, what the next tier needs, and how long the tier holds if
    nothing more is earned (the downgrade date, grace included)."""

    tier: str
    metric_unit: str
    window: str
    qualifying: int
    to_keep: int  # the least that, earned now, still holds the tier at `held_until` (0: nothing now can)
    next_tier: str  # "" at the top level
    next_threshold: int
    to_next: int
    held_until: datetime | None  # None: the entry level, nothing to lose
    then: str  # the tier from `held_until` on, with nothing more earned


HORIZON_MONTHS = 40  # a level holds at most the next full year and a grace of up to a year (366 days)


def tier_standing(policy: TierPolicy, buckets: Mapping[str, int], at: datetime) -> TierStanding:
    """Computed with `effective_level` itself at every instant the level can change (a month
    start, and a month start plus the grace, in the program's zone), so the date shown is the
    one the next purchase would be priced by, not a second reading of the policy; and what
    keeping the tier takes is the least that, earned now, still holds it at that date."""
    zone = _zone(policy.timezone)
    local = at.astimezone(zone)
    level = effective_level(policy, buckets, at)
    month = _month_number(local)
    if policy.window == ROLLING_12_MONTHS:
        qualifying = sum(buckets.get(_bucket_name(n), 0) for n in range(month - ROLLING_BUCKETS + 1, month + 1))
    else:
        qualifying = _year_total(buckets, local.year, local.month)
    next_tier, next_threshold = policy.levels[level + 1] if level + 1 < len(policy.levels) else ("", 0)
    held_until, after = _drop(policy, buckets, local, level)
    then = policy.levels[after][0]
    return TierStanding(
        policy.levels[level][0], policy.metric_unit, policy.window, qualifying,
        _to_keep(policy, buckets, month, level, held_until), next_tier, next_threshold,
        max(0, next_threshold - qualifying) if next_tier else 0, held_until, then,
    )  # fmt: skip


LAST_MONTH = 9998 * 12  # month starts searched stay clear of datetime's year 9999


def lapse_of(policy: TierPolicy, buckets: Mapping[str, int], at: datetime) -> datetime | None:
    """When the tier held at `at` drops if nothing more is earned (None: the entry level);
    `tier_standing`'s `held_until` without the rest of the standing."""
    local = at.astimezone(_zone(policy.timezone))
    return _drop(policy, buckets, local, effective_level(policy, buckets, at))[0]


def _drop(policy: TierPolicy, buckets: Mapping[str, int], local: datetime, level: int) -> tuple[datetime | None, int]:
    """The first instant after `local` at which `level` no longer holds, and the level then."""
    if not level:
        return None, level
    zone, month = local.tzinfo, _month_number(local)
    grace = timedelta(days=policy.grace_days)
    # Credits of months after `local` (asked about the past) count later: search past them too.
    last = max([month, *(n for key in buckets if (n := _month_of_bucket(key)) is not None)]) + HORIZON_MONTHS
    starts = [datetime(n // 12, n % 12 + 1, 1, tzinfo=zone) for n in range(month - 13, min(last, LAST_MONTH))]
    for when in sorted({t for s in starts for t in (s, s + grace)}):
        if when > local and (after := effective_level(policy, buckets, when)) < level:
            return when, after
    return None, level


def _month_of_bucket(key: str) -> int | None:
    year, _, month = key.partition("-")
    return int(year) * 12 + int(month) - 1 if year.isdigit() and month.isdigit() else None


def _to_keep(
    policy: TierPolicy, buckets: Mapping[str, int], month: int, level: int, held_until: datetime | None
) -> int:
    """The least credits that, earned this month, still hold `level` at `held_until`; 0 when
    nothing is to be lost, or nothing earned now can hold it longer (a calendar year's tier
    earned this year: only next year's credits extend it)."""
    threshold = policy.levels[level][1]
    if held_until is None:
        return 0
    now = _bucket_name(month)

    def keeps(extra: int) -> bool:
        return effective_level(policy, {**buckets, now: buckets.get(now, 0) + extra}, held_until) >= level

    if not keeps(threshold):
        return 0
    low, high = 0, threshold  # keeps(high); not keeps(0), since the level drops at held_until
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if keeps(mid) else (mid, high)
    return high
