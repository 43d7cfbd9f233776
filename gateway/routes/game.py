"""Gamification for channels: a member's progress, running challenges, opting in, leaderboards."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Query
from google.protobuf.timestamp_pb2 import Timestamp

from gateway import schemas as s
from gateway.auth import Principal
from gateway.deps import GatewayDep, IdPath, call, reads_member, scoped, scoped_or_member
from gateway.strict_json import StrictJsonRoute
from pointmesh.v1 import ledger_pb2, rules_pb2

router = APIRouter(tags=["gamification"], route_class=StrictJsonRoute)
RULES, LEDGER = "rules_svc", "ledger_svc"


def _when(ts: Timestamp, present: bool) -> datetime | None:
    return ts.ToDatetime(tzinfo=UTC) if present else None


@router.get("/v1/members/{member_id}/progress", response_model=s.Progress, dependencies=[reads_member],
            summary="Achievements, streaks and challenges of a member, with rewards paid")  # fmt: skip
async def progress(member_id: IdPath, gw: GatewayDep) -> s.Progress:
    # rules_svc keeps progress for any id it is asked about: an unknown member is 404, as on every member route.
    await call(LEDGER, gw.ledger.GetMember(ledger_pb2.GetMemberRequest(member_id=member_id)))
    found = await call(RULES, gw.rules.GetMemberProgress(
        rules_pb2.GetMemberProgressRequest(program=gw.settings.program, member_id=member_id)))  # fmt: skip
    return s.Progress(
        member_id=member_id, rewards_paid_points=found.rewards_paid_points,
        rewards_pending_points=found.rewards_pending_points,
        items=[s.GameItem(
            item_id=i.item_id, name=i.name, kind=rules_pb2.GameItemKind.Name(i.kind).removeprefix("GAME_ITEM_KIND_"),
            progress=i.progress, goal=i.goal, completions=i.completions,
            last_completed_at=_when(i.last_completed_at, i.HasField("last_completed_at")),
            reward_points=i.reward_points, reward_unit=i.reward_unit, joined=i.joined,
        ) for i in found.items],
    )  # fmt: skip


@router.get("/v1/challenges", response_model=s.Challenges, dependencies=[scoped("program:read")],
            summary="Challenges running now")  # fmt: skip
async def challenges(gw: GatewayDep) -> s.Challenges:
    found = await call(RULES, gw.rules.ListChallenges(rules_pb2.ListChallengesRequest(program=gw.settings.program)))
    return s.Challenges(challenges=[s.ChallengeOut(
        challenge_id=c.challenge_id, name=c.name, starts_at=c.starts_at.ToDatetime(tzinfo=UTC),
        ends_at=c.ends_at.ToDatetime(tzinfo=UTC), goal_purchases=c.goal_purchases, reward_points=c.reward_points,
        reward_unit=c.reward_unit, opt_in=c.opt_in,
    ) for c in found.challenges])  # fmt: skip


@router.post("/v1/challenges/{challenge_id}/join", summary="Opt a member in to a challenge (idempotent)")
async def join(
    challenge_id: IdPath, body: s.JoinChallenge, gw: GatewayDep,
    # A channel backend enrolling its member needs members:write (reading is not needed).
    caller: Annotated[Principal, scoped_or_member("members:write")],
) -> dict[str, bool]:  # fmt: skip
    if caller.key is None:
        caller.may_read_member(body.member_id)  # a member token joins its own member only
    # rules_svc would keep a row for any id: an unknown member is 404, as on every member route.
    await call(LEDGER, gw.ledger.GetMember(ledger_pb2.GetMemberRequest(member_id=body.member_id)))
    found = await call(RULES, gw.rules.JoinChallenge(rules_pb2.JoinChallengeRequest(
        program=gw.settings.program, challenge_id=challenge_id, member_id=body.member_id)))  # fmt: skip
    return {"joined": found.joined}


@router.get("/v1/challenges/{challenge_id}/leaderboard", response_model=s.Leaderboard,
            dependencies=[scoped("program:read")],
            summary="Members ranked by progress (ties: who finished first)")  # fmt: skip
async def leaderboard(
    challenge_id: IdPath, gw: GatewayDep, limit: Annotated[int, Query(ge=1, le=100)] = 10
) -> s.Leaderboard:
    found = await call(RULES, gw.rules.GetLeaderboard(rules_pb2.GetLeaderboardRequest(
        program=gw.settings.program, challenge_id=challenge_id, limit=limit)))  # fmt: skip
    return s.Leaderboard(challenge_id=challenge_id, entries=[s.LeaderboardEntry(
        rank=e.rank, member_id=e.member_id, progress=e.progress,
        completed_at=_when(e.completed_at, e.HasField("completed_at")),
    ) for e in found.entries])  # fmt: skip
