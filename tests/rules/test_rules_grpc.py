"""rules_svc through a real gRPC server: publishing versions, evaluating, simulating."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2

from pointmesh.errors import status_details
from pointmesh.timestamps import to_timestamp
from pointmesh.v1 import common_pb2, rules_pb2
from rules_svc.domain import ProgramRejected
from tests.conftest import RulesUnderTest, start_rules, stop_rules

PROGRAM = """
program: shop
default_timezone: Europe/Helsinki
channels: [pos, app]
stores: [{id: HEL-01, timezone: Europe/Helsinki}, {id: LIS-01, timezone: Europe/Lisbon}]
base_rates: [{currency: EUR, points: 1, per_minor: 100}]
rules:
{rules}
"""
WEEKEND = "  - {id: weekend, when: {days_of_week: [sat, sun]}, effect: {multiplier: '2'}}"
BLACK_FRIDAY = "  - {id: black-friday, when: {channels: [pos]}, effect: {multiplier: '3'}}"


def doc(*rules: str) -> str:
    return PROGRAM.replace("{rules}", "\n".join(rules) if rules else "  []")


def key(k: str) -> common_pb2.IdempotencyKey:
    return common_pb2.IdempotencyKey(namespace="test", key=k)


def eur(minor: int) -> common_pb2.Money:
    return common_pb2.Money(amount_minor=minor, currency="EUR")


def basket(at: datetime, *amounts: int, store: str = "HEL-01", channel: str = "pos") -> rules_pb2.Basket:
    lines = [
        rules_pb2.BasketLine(sku=f"sku{i}", category="misc", quantity=1, amount=eur(a)) for i, a in enumerate(amounts)
    ]
    return rules_pb2.Basket(
        channel=channel,
        store_id=store,
        receipt_id="r1",
        total=eur(sum(amounts)),
        lines=lines,
        receipt_time=to_timestamp(at),
    )


async def publish(
    rules: RulesUnderTest, k: str, text: str, effective: datetime | None = None
) -> rules_pb2.ProgramVersion:
    response = await rules.stub.PublishProgram(
        rules_pb2.PublishProgramRequest(idempotency_key=key(k), document=text, effective_from=to_timestamp(effective))
    )
    return response.version


def totals(e: rules_pb2.Evaluation) -> dict[str, int]:
    """Totals as reported, after checking the explained parts add up to them exactly."""
    summed: dict[str, int] = {}
    for part in e.parts:
        summed[part.unit] = summed.get(part.unit, 0) + part.points
    reported = {t.unit: t.points for t in e.totals}
    assert summed == reported
    return reported


SATURDAY = datetime(2026, 1, 3, 10, 0, tzinfo=UTC)
MONDAY = datetime(2026, 1, 5, 10, 0, tzinfo=UTC)


async def test_weekend_double_points_through_grpc_with_exact_explanation(rules: RulesUnderTest) -> None:
    await publish(rules, "v1", doc(WEEKEND), rules.clock.now())
    sat = await rules.stub.Evaluate(rules_pb2.EvaluateRequest(program="shop", basket=basket(SATURDAY, 1250, 899)))
    mon = await rules.stub.Evaluate(rules_pb2.EvaluateRequest(program="shop", basket=basket(MONDAY, 1250, 899)))
    # base: 12 + 8 = 20; weekend adds 12 + 8 more
    assert totals(sat.evaluation) == {"points": 40}
    assert totals(mon.evaluation) == {"points": 20}
    assert {p.rule_id for p in sat.evaluation.parts} == {"base", "weekend"}
    assert sat.evaluation.version == 1
    assert sat.evaluation.store_local_time.startswith("2026-01-03T12:00:00+02:00")


async def test_bad_program_is_refused_with_every_field_path_and_the_active_version_stays(rules: RulesUnderTest) -> None:
    await publish(rules, "good", doc(WEEKEND), rules.clock.now())
    bad = doc(WEEKEND, "  - {id: hh, when: {time_window: {start: '25:00', end: '20:00'}}, effect: {multiplier: 1.5}}")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await publish(rules, "bad", bad)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    violations = {
        v.field
        for d in status_details(caught.value)
        if isinstance(d, error_details_pb2.BadRequest)
        for v in d.field_violations
    }
    assert violations == {"rules[1].when.time_window.start", "rules[1].effect.multiplier"}
    listed = await rules.stub.ListVersions(rules_pb2.ListVersionsRequest(program="shop"))
    assert [v.version for v in listed.versions] == [1]
    after = await rules.stub.Evaluate(rules_pb2.EvaluateRequest(program="shop", basket=basket(SATURDAY, 1000)))
    assert after.evaluation.version == 1


async def test_late_receipt_earns_under_the_version_in_effect_at_its_receipt_time(rules: RulesUnderTest) -> None:
    start = rules.clock.now()
    await publish(rules, "v1", doc(WEEKEND), start)
    rules.clock.advance(timedelta(days=10))
    await publish(rules, "v2", doc(WEEKEND, BLACK_FRIDAY), rules.clock.now())
    # A Monday receipt from before v2 (arriving now) earns under v1; one after v2, under v2.
    early = await rules.stub.Evaluate(rules_pb2.EvaluateRequest(program="shop", basket=basket(MONDAY, 1000)))
    late = await rules.stub.Evaluate(
        rules_pb2.EvaluateRequest(program="shop", basket=basket(MONDAY + timedelta(days=7), 1000))
    )
    assert (early.evaluation.version, totals(early.evaluation)) == (1, {"points": 10})
    assert (late.evaluation.version, totals(late.evaluation)) == (2, {"points": 30})
    pinned = await rules.stub.Evaluate(
        rules_pb2.EvaluateRequest(program="shop", version=1, basket=basket(MONDAY + timedelta(days=7), 1000))
    )
    assert totals(pinned.evaluation) == {"points": 10}


async def test_scheduled_version_applies_only_from_its_effective_time(rules: RulesUnderTest) -> None:
    now = rules.clock.now()
    await publish(rules, "v1", doc(), now)
    await publish(rules, "v2", doc(BLACK_FRIDAY), now + timedelta(days=30))
    before = await rules.stub.Evaluate(
        rules_pb2.EvaluateRequest(program="shop", basket=basket(now + timedelta(days=29), 1000))
    )
    after = await rules.stub.Evaluate(
        rules_pb2.EvaluateRequest(program="shop", basket=basket(now + timedelta(days=31), 1000))
    )
    assert totals(before.evaluation) == {"points": 10}
    assert totals(after.evaluation) == {"points": 30}


async def test_publish_is_idempotent_and_a_reused_key_with_another_document_conflicts(rules: RulesUnderTest) -> None:
    first = await publish(rules, "k", doc(WEEKEND))
    again = await publish(rules, "k", doc(WEEKEND))
    assert (again.version, again.sha256) == (first.version, first.sha256)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await publish(rules, "k", doc(BLACK_FRIDAY))
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
    listed = await rules.stub.ListVersions(rules_pb2.ListVersionsRequest(program="shop"))
    assert len(listed.versions) == 1


async def test_published_version_is_immutable_and_readable(rules: RulesUnderTest) -> None:
    v1 = await publish(rules, "a", doc(WEEKEND))
    await publish(rules, "b", doc(BLACK_FRIDAY))
    got = await rules.stub.GetProgram(rules_pb2.GetProgramRequest(program="shop", version=v1.version))
    assert '"weekend"' in got.document_json and "black-friday" not in got.document_json
    assert got.version.sha256 == v1.sha256
    current = await rules.stub.GetProgram(rules_pb2.GetProgramRequest(program="shop"))
    assert current.version.version == 2
    store = rules.app.store
    with pytest.raises(Exception, match="immutable"):
        store._db.execute("UPDATE versions SET document_json='{}' WHERE version=1")


async def test_simulate_runs_a_draft_without_publishing(rules: RulesUnderTest) -> None:
    await publish(rules, "v1", doc())
    item = rules_pb2.EvaluateItem(basket=basket(MONDAY, 1000))
    sim = await rules.stub.Simulate(rules_pb2.SimulateRequest(document=doc(BLACK_FRIDAY), items=[item, item]))
    assert [totals(r.evaluation) for r in sim.results] == [{"points": 30}, {"points": 30}]
    listed = await rules.stub.ListVersions(rules_pb2.ListVersionsRequest(program="shop"))
    assert len(listed.versions) == 1
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await rules.stub.Simulate(rules_pb2.SimulateRequest(document="program: [", items=[item]))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_evaluate_batch_reports_bad_baskets_per_item(rules: RulesUnderTest) -> None:
    await publish(rules, "v1", doc(WEEKEND))
    good = rules_pb2.EvaluateItem(basket=basket(SATURDAY, 500))
    wrong_total = rules_pb2.EvaluateItem(basket=basket(SATURDAY, 500))
    wrong_total.basket.total.amount_minor = 501
    unknown_store = rules_pb2.EvaluateItem(basket=basket(SATURDAY, 500, store="OSL-01"))
    negative = rules_pb2.EvaluateItem(basket=basket(SATURDAY, 500))
    negative.basket.lines[0].quantity = -1
    yen = rules_pb2.EvaluateItem(basket=basket(SATURDAY, 500))
    yen.basket.total.currency = "JPY"
    for line in yen.basket.lines:
        line.amount.currency = "JPY"
    result = await rules.stub.EvaluateBatch(
        rules_pb2.EvaluateBatchRequest(program="shop", items=[good, wrong_total, unknown_store, negative, yen])
    )
    outcomes = [(r.WhichOneof("outcome"), r.error.field) for r in result.results]
    assert outcomes == [
        ("evaluation", ""),
        ("error", "basket.total_minor"),
        ("error", "basket.store_id"),
        ("error", "basket.lines[0].quantity"),
        ("error", "basket.currency"),
    ]
    assert totals(result.results[0].evaluation) == {"points": 10}


async def test_unknown_program_and_receipt_before_first_version_are_clear_errors(rules: RulesUnderTest) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await rules.stub.Evaluate(rules_pb2.EvaluateRequest(program="nope", basket=basket(MONDAY, 100)))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    await publish(rules, "v1", doc(), rules.clock.now())
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await rules.stub.Evaluate(
            rules_pb2.EvaluateRequest(program="shop", basket=basket(rules.clock.now() - timedelta(days=1), 100))
        )
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "receipt_time" in caught.value.details()


async def test_publishing_into_the_past_is_refused(rules: RulesUnderTest) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await publish(rules, "past", doc(), rules.clock.now() - timedelta(hours=1))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith("effective_from:")


async def test_a_broken_seed_file_does_not_stop_a_service_that_has_published_versions(tmp_path: Path) -> None:
    seed = tmp_path / "program.yaml"
    seed.write_text(doc(WEEKEND))
    first = await start_rules(tmp_path / "rules", rules_seed_file=str(seed), program="shop")
    await stop_rules(first)
    seed.write_text(doc(WEEKEND.replace("'2'", "two")))  # an edit that no longer validates
    again = await start_rules(tmp_path / "rules", rules_seed_file=str(seed), program="shop")
    try:
        assert [v.version for v in await _listed(again)] == [1]
        sat = await again.stub.Evaluate(rules_pb2.EvaluateRequest(program="shop", basket=basket(SATURDAY, 1000)))
        assert totals(sat.evaluation) == {"points": 20}
    finally:
        await stop_rules(again)
    with pytest.raises(ProgramRejected):  # on a fresh install the seed is all there is: refuse loudly
        await start_rules(tmp_path / "fresh", rules_seed_file=str(seed), program="shop")


async def _listed(rules: RulesUnderTest) -> list[rules_pb2.ProgramVersion]:
    return list((await rules.stub.ListVersions(rules_pb2.ListVersionsRequest(program="shop"))).versions)


@pytest.mark.parametrize("again", ["2026-02-28T22:00:00Z", "2026-03-01T03:00:00+05:00"])
async def test_a_campaign_made_longer_with_its_start_written_at_another_offset_keeps_its_counter(
    rules: RulesUnderTest, again: str
) -> None:
    """docs/rules.md, Caps: the same run made longer (same start, later end) keeps counting. The
    start, the same instant copied as UTC, named a new counter: every member's cap again."""

    def promo(start: str, end: str) -> str:
        return (f"  - {{id: promo, effect: {{bonus_points: 100}}, caps: {{per_member_per_campaign: 100}},"
                f" when: {{date_range: {{start: '{start}', end: '{end}'}}}}}}")  # fmt: skip

    at = datetime(2026, 3, 10, 12, tzinfo=UTC)
    await publish(rules, "c1", doc(promo("2026-03-01T00:00:00+02:00", "2026-03-15T00:00:00+02:00")),
                  datetime(2026, 1, 1, tzinfo=UTC))  # fmt: skip
    first = await rules.stub.Evaluate(rules_pb2.EvaluateRequest(program="shop", basket=basket(at, 1000)))
    await publish(rules, "c2", doc(promo(again, "2026-03-22T00:00:00+02:00")), datetime(2026, 2, 1, tzinfo=UTC))
    later = await rules.stub.Evaluate(rules_pb2.EvaluateRequest(program="shop", basket=basket(at, 1000)))

    counters = [[p.guard.counter for p in e.evaluation.parts if p.rule_id == "promo"] for e in (first, later)]
    assert counters[0] == counters[1] == ["promo:campaign:2026-03-01T00:00:00+02:00"]
    assert later.evaluation.version > first.evaluation.version
