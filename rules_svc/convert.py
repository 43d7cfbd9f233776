"""protobuf <-> rules domain values. The servicer and the ledger's rules client both use it."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from pointmesh.bounds import MAX_AMOUNT_MINOR, MAX_POINTS
from pointmesh.guards import Guard
from pointmesh.tiers import first_non_month
from pointmesh.timestamps import from_timestamp, to_timestamp
from pointmesh.v1 import common_pb2, rules_pb2
from rules_svc.domain import BadRequest, Basket, Evaluation, Line, MemberContext, RulesError
from rules_svc.experiment_stats import ALPHA
from rules_svc.game_service import ExperimentReport, ItemKind, ProgressItem
from rules_svc.game_store import BoardRow
from rules_svc.program import Challenge
from rules_svc.versions import VersionInfo


def _time(message: Any, field: str, path: str) -> Any:
    if not message.HasField(field):
        return None
    try:
        return from_timestamp(getattr(message, field))
    except ValueError as exc:
        raise BadRequest(str(exc), field=path) from None


def _amount(value: int, field: str) -> None:
    if value > MAX_AMOUNT_MINOR:
        raise BadRequest(f"must be at most {MAX_AMOUNT_MINOR} minor units, got {value}", field=field)


def basket(m: rules_pb2.Basket, path: str = "basket") -> Basket:
    when = _time(m, "receipt_time", f"{path}.receipt_time")
    if when is None:
        raise BadRequest("is required", field=f"{path}.receipt_time")
    currency = m.total.currency
    _amount(m.total.amount_minor, f"{path}.total.amount_minor")
    lines = []
    for i, ln in enumerate(m.lines):
        _amount(ln.amount.amount_minor, f"{path}.lines[{i}].amount.amount_minor")
        if ln.amount.currency != currency:
            raise BadRequest(
                f"is {ln.amount.currency!r} but the basket total is in {currency!r}",
                field=f"{path}.lines[{i}].amount.currency",
            )
        lines.append(Line(ln.sku, ln.category, ln.quantity, ln.amount.amount_minor))
    return Basket(m.channel, m.store_id, m.receipt_id, currency, m.total.amount_minor, tuple(lines), when)


def member(m: rules_pb2.MemberContext, path: str = "member") -> MemberContext:
    """BadRequest for a qualification key that is no month, as GetTierStatus refuses it: the
    tier arithmetic reads only "YYYY-MM" buckets, and would price the member as if the credits
    were not there."""
    if (month := first_non_month(m.qualification)) is not None:
        raise BadRequest(f"{month!r} is not a month (YYYY-MM)", field=f"{path}.qualification[{month!r}]")
    return MemberContext(
        m.member_id, m.tier, tuple(m.segments), dict(m.attributes), m.purchase_count,
        dict(m.counters) if m.preview_counters else None, dict(m.qualification),
    )  # fmt: skip


def item(m: rules_pb2.EvaluateItem, index: int) -> tuple[Basket, MemberContext] | RulesError:
    try:
        return basket(m.basket, f"items[{index}].basket"), member(m.member, f"items[{index}].member")
    except RulesError as error:
        return error


def guard_pb(g: Guard | None) -> rules_pb2.Guard | None:
    if g is None:
        return None
    return rules_pb2.Guard(
        counter=g.counter, limit=g.limit, ordinal_equals=g.ordinal_equals, ordinal_every=g.ordinal_every
    )


def evaluation_pb(e: Evaluation) -> rules_pb2.Evaluation:
    """BadRequest naming the basket for an evaluation the ledger could not post (more than
    MAX_POINTS in a unit, or in one part) or a response cannot carry (a figure past int64)."""
    try:
        return _evaluation_pb(e)
    except ValueError as exc:
        raise BadRequest(f"the evaluation does not fit a response: {exc}", field="basket") from None


def _evaluation_pb(e: Evaluation) -> rules_pb2.Evaluation:
    out = rules_pb2.Evaluation(
        program=e.program, version=e.version, earn_currency=e.earn_currency, fx_rate=e.fx_rate,
        earn_amounts_minor=e.earn_amounts_minor, expires_at=to_timestamp(e.expires_at),
        release_at=to_timestamp(e.release_at), store_local_time=e.local_time.isoformat(),
        max_lateness_days=e.policy.max_lateness_days, basket_bonus_on_return=e.policy.basket_bonus_on_return.value,
        tier=e.tier, experiment_arms=dict(e.experiment_arms), ignores_purchase_count=not e.counts_purchases,
        base_total=common_pb2.Money(currency=e.base_total[0], amount_minor=e.base_total[1]) if e.base_total else None,
    )  # fmt: skip
    totals = e.totals()
    for part in e.components:
        if abs(part.points) > MAX_POINTS:
            raise BadRequest(
                f"rule {part.rule_id} alone earns {part.points} {part.unit}; an evaluation may earn at most "
                f"{MAX_POINTS} per unit",
                field="basket",
            )
        out.parts.append(rules_pb2.ExplainedPart(
            rule_id=part.rule_id, unit=part.unit, points=part.points, line_index=part.line, detail=part.detail,
            matched=part.matched, capped=part.capped, guard=guard_pb(part.guard),
            basket_threshold_minor=part.threshold_minor, fixed_bonus=part.fixed,
            multiplied_lines=[rules_pb2.LinePoints(line_index=i, points=b) for i, b in part.line_bases],
        ))  # fmt: skip
    for unit, points in totals.items():
        if abs(points) > MAX_POINTS:
            raise BadRequest(
                f"earns {points} {unit}; an evaluation may earn at most {MAX_POINTS} per unit", field="basket"
            )
    out.totals.extend(rules_pb2.UnitPoints(unit=u, points=p) for u, p in totals.items())
    out.excluded.extend(rules_pb2.ExcludedRule(rule_id=x.rule_id, reason=x.reason) for x in e.excluded)
    if e.tiers is not None:
        out.tier_policy.CopyFrom(rules_pb2.TierPolicy(
            metric_unit=e.tiers.metric_unit, window=e.tiers.window.value,
            downgrade_grace_days=e.tiers.downgrade_grace_days, timezone=e.tier_timezone,
            levels=[rules_pb2.TierLevel(code=t.code, threshold=t.threshold) for t in e.tiers.levels],
        ))  # fmt: skip
    return out


def version_pb(v: VersionInfo) -> rules_pb2.ProgramVersion:
    return rules_pb2.ProgramVersion(
        program=v.program, version=v.version, published_at=to_timestamp(v.published_at),
        effective_from=to_timestamp(v.effective_from), published_by=v.published_by, sha256=v.sha256,
    )  # fmt: skip


def key_of(m: common_pb2.IdempotencyKey) -> tuple[str, str]:
    return m.namespace or "default", m.key


def optional_time(message: Any, field: str) -> datetime | None:
    if not message.HasField(field):
        return None
    try:
        return from_timestamp(getattr(message, field))
    except ValueError as exc:
        raise BadRequest(str(exc), field=field) from None


_GAME_KINDS = {
    ItemKind.ACHIEVEMENT: rules_pb2.GAME_ITEM_KIND_ACHIEVEMENT,
    ItemKind.STREAK: rules_pb2.GAME_ITEM_KIND_STREAK,
    ItemKind.CHALLENGE: rules_pb2.GAME_ITEM_KIND_CHALLENGE,
}


def _from_us(value: int | None) -> Any:
    return to_timestamp(datetime.fromtimestamp(value / 1_000_000, UTC)) if value else None


def game_progress_pb(item: ProgressItem) -> rules_pb2.GameProgress:
    return rules_pb2.GameProgress(
        item_id=item.item_id, name=item.name, kind=_GAME_KINDS[item.kind], progress=item.progress, goal=item.goal,
        completions=item.completions, last_completed_at=_from_us(item.last_completed_us),
        reward_points=item.reward_points, reward_unit=item.reward_unit, joined=item.joined,
    )  # fmt: skip


def challenge_pb(c: Challenge) -> rules_pb2.Challenge:
    return rules_pb2.Challenge(
        challenge_id=c.id, name=c.name, starts_at=to_timestamp(c.starts), ends_at=to_timestamp(c.ends),
        goal_purchases=c.purchases, reward_points=c.reward.points, reward_unit=c.reward.unit, opt_in=c.opt_in,
    )  # fmt: skip


def leaderboard_pb(rank: int, row: BoardRow) -> rules_pb2.LeaderboardEntry:
    return rules_pb2.LeaderboardEntry(
        rank=rank, member_id=row.member_id, progress=row.progress, completed_at=_from_us(row.completed_us)
    )


def _interval(bounds: tuple[float, float]) -> rules_pb2.Interval:
    return rules_pb2.Interval(low=bounds[0], high=bounds[1])


def experiment_report_pb(found: ExperimentReport) -> rules_pb2.GetExperimentReportResponse:
    e = found.experiment
    out = rules_pb2.GetExperimentReportResponse(
        experiment_id=e.id, name=e.name, starts_at=to_timestamp(e.starts), ends_at=to_timestamp(e.ends), alpha=ALPHA
    )
    for a in found.arms:
        out.arms.append(rules_pb2.ArmResult(
            arm=a.arm, control=a.arm == e.control, members=a.members, purchases_per_member=a.purchases_per_member,
            purchases_per_member_ci=_interval(a.purchases_ci), repeat_rate=a.repeat_rate,
            repeat_rate_ci=_interval(a.repeat_ci), points_per_member=a.points_per_member, repeat_lift=a.repeat_lift,
            repeat_lift_ci=_interval(a.lift_ci), p_value_repeat=a.p_repeat, p_value_purchases=a.p_purchases,
            points_per_incremental_purchase=a.points_per_incremental_purchase or 0.0, significant=a.significant,
        ))  # fmt: skip
    return out
