"""A member's tier standing on the wire (rules_pb2.TierStatus), both ways: rules_svc computes
it, the ledger relays it for a member, and both speak the one message."""

from __future__ import annotations

from pointmesh.tiers import TierStanding
from pointmesh.timestamps import from_timestamp, to_timestamp
from pointmesh.v1 import rules_pb2


def tier_status_pb(program: str, version: int, s: TierStanding) -> rules_pb2.TierStatus:
    return rules_pb2.TierStatus(
        program=program, version=version, tier=s.tier, metric_unit=s.metric_unit, window=s.window,
        qualifying_points=s.qualifying, points_to_keep=s.to_keep, next_tier=s.next_tier,
        next_threshold=s.next_threshold, points_to_next=s.to_next, held_until=to_timestamp(s.held_until),
        tier_after=s.then,
    )  # fmt: skip


def tier_standing_of(pb: rules_pb2.TierStatus) -> tuple[str, int, TierStanding]:
    """(program, version, standing)."""
    held = from_timestamp(pb.held_until) if pb.HasField("held_until") else None
    return pb.program, pb.version, TierStanding(
        pb.tier, pb.metric_unit, pb.window, pb.qualifying_points, pb.points_to_keep, pb.next_tier,
        pb.next_threshold, pb.points_to_next, held, pb.tier_after,
    )  # fmt: skip
