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

from collections.abc import Mapping, Sequence
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


def bucket_of(at: datetime, timezone: str = "UTC") -> str:
    return at.astimezone(_zone(timezone)).strftime("%Y-%m")


def _months_back(at: datetime, count: int) -> list[str]:
    year, month = at.year, at.month
    out = []
    for _ in range(count):
        out.append(f"{year:04d}-{month:02d}")
        month -= 1
        if month == 0:
            year, month = year - 1, 12
    return out


def _year_total(buckets: Mapping[str, int], year: int) -> int:
    return sum(buckets.get(f"{year:04d}-{m:02d}", 0) for m in range(1, 13))


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
        now = sum(buckets.get(b, 0) for b in _months_back(at, ROLLING_BUCKETS))
        earlier = sum(buckets.get(b, 0) for b in _months_back((at - grace).astimezone(zone), ROLLING_BUCKETS))
        return max(level_for(policy.levels, now), level_for(policy.levels, earlier))
    year = at.year
    levels = [
        level_for(policy.levels, _year_total(buckets, year)),
        level_for(policy.levels, _year_total(buckets, year - 1)),
    ]
    if at < datetime(year, 1, 1, tzinfo=zone) + grace:
        levels.append(level_for(policy.levels, _year_total(buckets, year - 2)))
    return max(levels)


def effective_tier(policy: TierPolicy, buckets: Mapping[str, int], at: datetime) -> str:
    return policy.levels[effective_level(policy, buckets, at)][0]
