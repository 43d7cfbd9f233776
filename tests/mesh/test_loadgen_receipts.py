"""The generated day must look like the days fraud_svc's model learned from, whenever the run
starts: the model reads the hour of day, and a day laid out from the wall clock put tills'
receipts in the small hours on runs started at night (the share held for review then went from
0.05% to 17%)."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta

from fraud_svc.synth import POS_HOURS, WEB_HOURS
from loadtests.loadgen import generate
from pointmesh.timestamps import from_timestamp

MEMBERS = [f"m{i}" for i in range(400)]
STORES = ["HEL-01", "LIS-01"]


def _day(now: datetime) -> list[tuple[datetime, str]]:
    return [(from_timestamp(r.receipt_time), r.channel) for r in generate(7, MEMBERS, 3_000, now, STORES)]


def test_receipts_fall_on_yesterdays_utc_day_at_open_hours_whatever_the_start_hour() -> None:
    night = datetime(2026, 12, 6, 3, 17, tzinfo=UTC)
    afternoon = night.replace(hour=15, minute=40)
    for now in (night, afternoon):
        day = _day(now)
        times = [t for t, _ in day]
        assert times == sorted(times)  # receipt-time order, as the stream sends them
        assert all(datetime(2026, 12, 5, tzinfo=UTC) <= t < datetime(2026, 12, 6, tzinfo=UTC) for t in times)
        closed = {h for h, w in enumerate(POS_HOURS) if w == 0}
        assert not [t for t, channel in day if channel == "pos" and t.hour in closed]
    # The same seed gives the same day, whatever the hour the run started.
    assert _day(night) == _day(afternoon)


def test_hours_follow_the_channel_profiles() -> None:
    day = _day(datetime(2026, 12, 6, 12, tzinfo=UTC))
    for channels, profile in ((("pos",), POS_HOURS), (("web", "app"), WEB_HOURS)):
        hours = Counter(t.hour for t, channel in day if channel in channels)
        n = sum(hours.values())
        for hour, weight in enumerate(profile):
            expected = n * weight / profile.sum()
            # Within a generous band of the profile (binomial sd is at most ~sqrt(expected)).
            assert abs(hours[hour] - expected) <= 5 * expected**0.5 + 3, (channels, hour, hours[hour], expected)
    assert timedelta(0) < max(t for t, _ in day) - min(t for t, _ in day) <= timedelta(days=1)
