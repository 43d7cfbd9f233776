"""Tier arithmetic shared by rules_svc and the ledger: upgrades at once, downgrades only at a
period end plus grace, calendar and rolling windows."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from pointmesh.tiers import (
    CALENDAR_YEAR,
    ROLLING_12_MONTHS,
    TierPolicy,
    bucket_of,
    effective_tier,
    lapse_of,
    same_standing,
    tier_standing,
)

LEVELS = (("blue", 0), ("silver", 1000), ("gold", 5000))
RANK = {code: i for i, (code, _threshold) in enumerate(LEVELS)}
CALENDAR = TierPolicy("tier_credits", CALENDAR_YEAR, 30, LEVELS)
ROLLING = TierPolicy("tier_credits", ROLLING_12_MONTHS, 30, LEVELS)


def at(y: int, m: int, d: int) -> datetime:
    return datetime(y, m, d, 12, tzinfo=UTC)


def test_upgrade_applies_as_soon_as_the_year_total_crosses() -> None:
    assert effective_tier(CALENDAR, {"2026-03": 999}, at(2026, 3, 10)) == "blue"
    assert effective_tier(CALENDAR, {"2026-03": 999, "2026-04": 1}, at(2026, 4, 1)) == "silver"


def test_a_late_receipt_meets_the_tier_of_its_own_month_not_one_reached_after_it() -> None:
    """Decision 0008: the tier at the receipt's time, whatever order receipts arrive in."""
    credits = {"2026-01": 4000, "2026-06": 1000}  # gold (5000) crossed by a June purchase
    for policy in (CALENDAR, ROLLING):
        assert effective_tier(policy, credits, at(2026, 5, 20)) == "silver", policy.window
        assert effective_tier(policy, credits, at(2026, 6, 10)) == "gold", policy.window


def test_a_tier_earned_in_a_year_holds_through_the_next_year_and_its_grace() -> None:
    earned_2025 = {"2025-06": 5200}
    assert effective_tier(CALENDAR, earned_2025, at(2026, 12, 31)) == "gold"
    assert effective_tier(CALENDAR, earned_2025, at(2027, 1, 20)) == "gold"  # grace: 30 days into 2027
    assert effective_tier(CALENDAR, earned_2025, at(2027, 2, 5)) == "blue"  # downgraded after the grace
    requalified = {**earned_2025, "2026-02": 1500}
    assert effective_tier(CALENDAR, requalified, at(2027, 2, 5)) == "silver"  # kept what 2026 earned


def test_rolling_window_counts_a_purchase_for_twelve_full_months_then_the_grace() -> None:
    credits = {"2026-01": 3000, "2026-06": 2500}
    assert effective_tier(ROLLING, credits, at(2026, 12, 15)) == "gold"
    # A purchase on 31 January 2026 still counts on 31 January 2027: January leaves the window
    # in February 2027, and the grace keeps gold for 30 days more.
    assert effective_tier(ROLLING, credits, at(2027, 1, 31)) == "gold"
    assert effective_tier(ROLLING, credits, at(2027, 2, 25)) == "gold"
    assert effective_tier(ROLLING, credits, at(2027, 3, 5)) == "silver"


def test_a_rolling_tier_keeps_its_grace_after_a_short_month_and_a_grace_longer_than_a_month() -> None:
    """Gold reached with the window ending February 2026 holds through February plus the
    grace. The two-window check (now, and `grace` ago) skipped the month between them: on
    1-2 March (30 days back is still January) gold fell to silver and came back on the 3rd;
    with a 90-day grace the months skipped were whole, and gold vanished for weeks."""
    credits = {"2025-02": 3000, "2026-02": 2500}
    days = [(2, 28), (3, 1), (3, 2), (3, 3), (3, 30), (4, 1)]
    assert [effective_tier(ROLLING, credits, at(2026, m, d)) for m, d in days] == [*["gold"] * 5, "silver"]
    long_grace = TierPolicy("tier_credits", ROLLING_12_MONTHS, 90, LEVELS)
    credits = {"2025-03": 3000, "2026-03": 2500}  # gold on the window ending March 2026
    days = [(4, 10), (5, 10), (6, 20), (6, 29), (7, 1)]
    assert [effective_tier(long_grace, credits, at(2026, m, d)) for m, d in days] == [*["gold"] * 4, "silver"]


def test_buckets_are_utc_months() -> None:
    assert bucket_of(datetime(2026, 12, 31, 23, 30, tzinfo=UTC)) == "2026-12"
    assert bucket_of(datetime.fromisoformat("2027-01-01T01:30:00+02:00")) == "2026-12"


def test_months_and_years_are_the_programs_not_utcs() -> None:
    """New Year's Eve, 23:30 in New York, is already 04:30 on 1 January in UTC: the purchase
    belongs to December and to the year that is ending where the member shopped."""
    new_york = TierPolicy("tier_credits", CALENDAR_YEAR, 0, LEVELS, "America/New_York")
    eve = datetime(2027, 1, 1, 4, 30, tzinfo=UTC)
    assert (bucket_of(eve), bucket_of(eve, "America/New_York")) == ("2027-01", "2026-12")
    earned = {"2026-12": 5000}
    assert effective_tier(new_york, earned, eve) == "gold"  # still 2026 there: the year's total counts
    assert effective_tier(CALENDAR, {"2027-01": 5000}, eve) == "gold"  # what UTC bucketing would say
    assert effective_tier(new_york, earned, datetime(2028, 1, 1, 4, 30, tzinfo=UTC)) == "gold"  # 2027's last day
    assert effective_tier(new_york, earned, datetime(2028, 1, 1, 5, 30, tzinfo=UTC)) == "blue"  # 2028 there


def test_standing_says_the_tier_what_the_next_needs_and_the_downgrade_date_grace_included() -> None:
    helsinki = TierPolicy("tier_credits", CALENDAR_YEAR, 30, LEVELS, "Europe/Helsinki")
    standing = tier_standing(helsinki, {"2026-03": 1200}, at(2026, 6, 1))
    assert (standing.tier, standing.qualifying, standing.next_tier, standing.to_next) == ("silver", 1200, "gold", 3800)
    # Silver earned in 2026 holds through 2027 and 30 days of 2028, from midnight in Helsinki.
    assert standing.held_until == datetime(2028, 1, 31, tzinfo=ZoneInfo("Europe/Helsinki"))
    assert (standing.then, standing.to_keep) == ("blue", 0)


def test_standing_of_a_tier_carried_from_last_year_says_what_keeping_it_takes() -> None:
    standing = tier_standing(CALENDAR, {"2025-03": 6000, "2026-02": 1500}, at(2026, 6, 1))
    assert (standing.tier, standing.qualifying, standing.next_tier) == ("gold", 1500, "")
    assert standing.held_until == datetime(2027, 1, 31, tzinfo=UTC)
    assert (standing.then, standing.to_keep) == ("silver", 3500)  # this year's 1500 keep silver


def test_standings_downgrade_date_is_the_instant_the_tier_drops() -> None:
    """Checked against effective_tier itself, just before and at the date, for both windows and
    zones either side of UTC."""
    for window in (CALENDAR_YEAR, ROLLING_12_MONTHS):
        for zone in ("UTC", "Europe/Helsinki", "America/New_York"):
            policy = TierPolicy("tier_credits", window, 45, LEVELS, zone)
            credits = {"2026-03": 5200, "2026-05": 1100}
            standing = tier_standing(policy, credits, at(2026, 6, 1))
            assert standing.held_until is not None, (window, zone)
            before = standing.held_until - timedelta(seconds=1)
            assert effective_tier(policy, credits, before) == "gold", (window, zone)
            assert effective_tier(policy, credits, standing.held_until) == standing.then != "gold", (window, zone)


def test_the_entry_tier_has_nothing_to_lose() -> None:
    standing = tier_standing(ROLLING, {}, at(2026, 6, 1))
    assert (standing.tier, standing.held_until, standing.to_next) == ("blue", None, 1000)


def test_keeping_a_rolling_tier_takes_what_still_counts_when_the_old_months_drop_off() -> None:
    policy = TierPolicy("tier_credits", ROLLING_12_MONTHS, 45, LEVELS)
    credits = {"2026-03": 5200, "2026-05": 1100}  # gold now; March's credits stop counting first
    standing = tier_standing(policy, credits, at(2026, 6, 1))
    assert (standing.tier, standing.then, standing.to_keep) == ("gold", "silver", 3900)
    assert standing.held_until is not None
    assert effective_tier(policy, {**credits, "2026-06": 3900}, standing.held_until) == "gold"
    assert effective_tier(policy, {**credits, "2026-06": 3899}, standing.held_until) == "silver"


def test_credits_of_months_after_the_instant_asked_about_are_searched_past() -> None:
    """GetTierStatus may be asked about a past instant: later months' credits hold the tier longer."""
    policy = TierPolicy("tier_credits", CALENDAR_YEAR, 366, LEVELS)
    standing = tier_standing(policy, {"2026-03": 1200, "2028-05": 6000}, at(2026, 6, 1))
    # Gold from 2028 holds through 2029 and 366 days of grace: 2030 has 365, so until 2 January 2031.
    assert (standing.tier, standing.held_until) == ("silver", datetime(2031, 1, 2, tzinfo=UTC))


def test_a_calendar_tier_with_a_366_day_grace_holds_through_the_last_day_of_it() -> None:
    """Gold reached in 2024 holds through 2025 and 366 days after it; 2026 has 365, so the grace
    runs into 2027 and the tier holds until 2 January 2027, three calendar years on, in the
    program's zone (Helsinki here) and in UTC alike."""
    for zone in ("UTC", "Europe/Helsinki", "America/New_York"):
        policy = TierPolicy("tier_credits", CALENDAR_YEAR, 366, LEVELS, zone)
        credits = {"2024-06": 5200}
        drops = datetime(2027, 1, 2, tzinfo=ZoneInfo(zone))
        assert effective_tier(policy, credits, drops - timedelta(hours=12)) == "gold", zone
        assert effective_tier(policy, credits, drops - timedelta(seconds=1)) == "gold", zone
        assert effective_tier(policy, credits, drops) == "blue", zone
        standing = tier_standing(policy, credits, datetime(2026, 6, 1, tzinfo=ZoneInfo(zone)))
        assert (standing.tier, standing.held_until, standing.then) == ("gold", drops, "blue"), zone


def test_standing_agrees_with_the_tier_arithmetic_on_random_credit_histories() -> None:
    """held_until is the instant the level drops, and to_keep the least that, earned now, still
    holds it then; both checked against effective_tier on seeded random cases."""
    rng = random.Random(2026)
    for case in range(400):
        window = rng.choice((CALENDAR_YEAR, ROLLING_12_MONTHS))
        zone = rng.choice(("UTC", "Europe/Helsinki", "America/Santiago", "Asia/Tokyo"))
        policy = TierPolicy("tier_credits", window, rng.choice((0, 1, 30, 45, 200, 366)), LEVELS, zone)
        when = at(2026, rng.randint(1, 12), rng.randint(1, 28))
        credits = {f"{y}-{m:02d}": rng.choice((300, 900, 2600, 5100)) for y in (2024, 2025, 2026, 2027)
                   for m in range(1, 13) if rng.random() < 0.12}  # fmt: skip
        s = tier_standing(policy, credits, when)
        assert s.tier == effective_tier(policy, credits, when), case
        if s.held_until is None:
            assert s.tier == "blue", case
            continue
        # Up to then at least this tier (later months' credits may raise it first), then below.
        assert RANK[effective_tier(policy, credits, s.held_until - timedelta(seconds=1))] >= RANK[s.tier], case
        assert effective_tier(policy, credits, s.held_until) == s.then, case
        assert RANK[s.then] < RANK[s.tier], case
        if s.to_keep:
            month = bucket_of(when, zone)
            more = {**credits, month: credits.get(month, 0) + s.to_keep}
            less = {**credits, month: credits.get(month, 0) + s.to_keep - 1}
            assert RANK[effective_tier(policy, more, s.held_until)] >= RANK[s.tier], case
            assert RANK[effective_tier(policy, less, s.held_until)] < RANK[s.tier], case


def test_instants_said_to_stand_alike_tier_alike_for_any_credits() -> None:
    """The ledger tiers a purchase at its receipt's time and again as of now only when
    same_standing says the two may differ: seeded pairs around month starts, grace ends and
    DST changes, each pair it calls alike checked with effective_tier on random credits."""
    rng = random.Random(1206)
    alike = 0
    for case in range(3000):
        window = rng.choice((CALENDAR_YEAR, ROLLING_12_MONTHS))
        zone = rng.choice(("UTC", "Europe/Helsinki", "America/Santiago", "Australia/Lord_Howe"))
        policy = TierPolicy("tier_credits", window, rng.choice((0, 1, 30, 45, 366)), LEVELS, zone)
        edge = datetime(2026, rng.randint(1, 12), 1, tzinfo=ZoneInfo(zone)) + timedelta(
            days=rng.choice((0, policy.grace_days))
        )
        earlier = edge + timedelta(minutes=rng.randint(-180, 180))
        later = earlier + timedelta(minutes=rng.choice((0, 1, 30, 90, 600)))
        credits = {f"{y}-{m:02d}": rng.choice((300, 900, 2600, 5100)) for y in (2024, 2025, 2026)
                   for m in range(1, 13) if rng.random() < 0.15}  # fmt: skip
        if same_standing(policy, earlier, later):
            alike += 1
            assert effective_tier(policy, credits, earlier) == effective_tier(policy, credits, later), case
        assert lapse_of(policy, credits, later) == tier_standing(policy, credits, later).held_until, case
    assert 300 < alike < 2700  # both answers were exercised
