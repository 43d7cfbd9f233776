"""protobuf Timestamp <-> aware datetime, shared by every servicer and client."""

from __future__ import annotations

from datetime import UTC, datetime

from google.protobuf.timestamp_pb2 import Timestamp


def utc_instant(when: datetime) -> datetime:
    """`when` as an aware UTC datetime. ValueError, saying why, for a time without a UTC offset
    (it would be read in the host's zone) or one whose UTC value falls outside years 1..9999
    (no Timestamp can hold it): edges that take times from outside check them with this."""
    if when.tzinfo is None or when.utcoffset() is None:
        raise ValueError(f"{when.isoformat()} has no UTC offset (add Z or +hh:mm)")
    return _in_utc(when)


def _in_utc(when: datetime) -> datetime:
    try:
        return when.astimezone(UTC)
    except OverflowError:
        raise ValueError(f"{when.isoformat()} is outside years 1..9999 once converted to UTC") from None


def to_timestamp(when: datetime | None) -> Timestamp | None:
    """ValueError for an aware time whose UTC value falls outside years 1..9999."""
    if when is None:
        return None
    out = Timestamp()
    out.FromDatetime(_in_utc(when))
    return out


def from_timestamp(value: Timestamp) -> datetime:
    """Aware UTC datetime; ValueError for seconds outside years 1..9999."""
    try:
        return value.ToDatetime(tzinfo=UTC)
    except (ValueError, OverflowError) as exc:
        raise ValueError("is not a valid timestamp (years 1..9999)") from exc
