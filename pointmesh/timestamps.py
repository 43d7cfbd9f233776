"""protobuf Timestamp <-> aware datetime, shared by every servicer and client."""

from __future__ import annotations

from datetime import UTC, datetime

from google.protobuf.timestamp_pb2 import Timestamp


def to_timestamp(when: datetime | None) -> Timestamp | None:
    if when is None:
        return None
    out = Timestamp()
    out.FromDatetime(when.astimezone(UTC))
    return out


def from_timestamp(value: Timestamp) -> datetime:
    """Aware UTC datetime; ValueError for seconds outside years 1..9999."""
    try:
        return value.ToDatetime(tzinfo=UTC)
    except (ValueError, OverflowError) as exc:
        raise ValueError("is not a valid timestamp (years 1..9999)") from exc
