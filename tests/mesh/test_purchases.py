"""RecordPurchase through the mesh: ledger -> rules_svc over gRPC, then an atomic earn.

Figures come from tests/mesh/program.yaml: 1 point and 1 tier credit per EUR, 1 point per
150 JPY, KWD via FX 0.332 per EUR, a 100-point welcome on the first purchase, weekend 2x
(3x in the app, best-of), a 2x happy hour 18-20 store-local at the POS, 5x on 'boost' capped
at 50 extra per member per day, 20 points on baskets of 100 EUR or more, silver (300 tier
credits in the calendar year) earning 2x.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import grpc

from pointmesh.v1 import common_pb2, ledger_pb2, rules_pb2
from tests.ledger.helpers import error_field, rpc_error
from tests.mesh.conftest import PROGRAM, Mesh
from tests.mesh.helpers import buy, by_rule, exact, new_member, points, purchase_request, welcomed_member

EARNED = ledger_pb2.PURCHASE_STATUS_EARNED


async def test_the_same_receipt_over_two_transports_earns_once(mesh: Mesh) -> None:
    member = await new_member(mesh)
    first = await buy(mesh, member, [("misc", 1250, 1)], receipt="R-1", transport_key="pos-retry-1")
    again = await buy(mesh, member, [("misc", 1250, 1)], receipt="R-1", transport_key="rest-idem-9")
    bare = await buy(mesh, member, [("misc", 1250, 1)], receipt="R-1")
    assert exact(first.purchase) == {"points": 112, "tier_credits": 12}  # 12 base + 100 welcome
    assert (first.replayed, again.replayed, bare.replayed) == (False, True, True)
    assert again.purchase.purchase_id == bare.purchase.purchase_id == first.purchase.purchase_id
    assert list(again.purchase.parts) == list(first.purchase.parts)
    assert await points(mesh, member) == 112


async def test_the_same_receipt_with_another_body_is_a_conflict_and_earns_nothing(mesh: Mesh) -> None:
    member = await new_member(mesh)
    await buy(mesh, member, [("misc", 1000, 1)], receipt="R-2")
    error = await rpc_error(buy(mesh, member, [("misc", 9000, 1)], receipt="R-2"), grpc.StatusCode.ALREADY_EXISTS)
    assert "purchase:meshmart" in error.details()
    assert await points(mesh, member) == 110


async def test_a_transport_key_reused_for_another_receipt_is_a_conflict(mesh: Mesh) -> None:
    member = await new_member(mesh)
    await buy(mesh, member, [("misc", 1000, 1)], receipt="R-3", transport_key="same-key")
    await rpc_error(
        buy(mesh, member, [("misc", 1000, 1)], receipt="R-4", transport_key="same-key"), grpc.StatusCode.ALREADY_EXISTS
    )
    assert await points(mesh, member) == 110


async def test_a_refused_receipt_leaves_its_transport_key_free(mesh: Mesh) -> None:
    member = await new_member(mesh)
    await buy(mesh, member, [("misc", 1000, 1)], receipt="R-5", transport_key="first-key")
    # The same receipt with another body: the natural key refuses it, and neither key is kept.
    await rpc_error(
        buy(mesh, member, [("misc", 2000, 1)], receipt="R-5", transport_key="second-key"),
        grpc.StatusCode.ALREADY_EXISTS,
    )
    other = await buy(mesh, member, [("misc", 3000, 1)], receipt="R-6", transport_key="second-key")
    assert (other.replayed, exact(other.purchase)["points"]) == (False, 30)
    assert await points(mesh, member) == 140  # 10 + 100 welcome, then 30


async def test_copies_of_one_receipt_sent_at_once_are_answered_as_replays_never_refused(mesh: Mesh) -> None:
    """A till that timed out fires the same purchase again while the first is in flight: one
    earns, the others answer with its purchase as replays. On Cassandra a copy whose write met
    the purchase row before its idempotency record was readable was refused FAILED_PRECONDITION
    ("recorded before; its replay record has expired"), telling the till a recorded receipt failed."""
    member = await welcomed_member(mesh)
    before = await points(mesh, member)
    for _ in range(6):
        request = purchase_request(member, [("misc", 2500, 1)], at=mesh.clock.now())
        answers = await asyncio.gather(*(mesh.ledger.stub.RecordPurchase(request) for _ in range(6)))
        assert sorted(a.replayed for a in answers) == [False] + [True] * 5
        assert len({a.purchase.purchase_id for a in answers}) == 1
    assert await points(mesh, member) == before + 6 * 25


async def test_concurrent_purchases_racing_for_the_last_of_a_member_cap_pay_it_once(mesh: Mesh) -> None:
    member = await welcomed_member(mesh)
    # Each basket: 5 base + 20 boost wanted; the day cap of 50 boost points is shared.
    results = await asyncio.gather(*(buy(mesh, member, [("boost", 500, 1)]) for _ in range(10)))
    boosts = sorted((by_rule(r.purchase).get("boost", 0) for r in results), reverse=True)
    assert sum(boosts) == 50
    assert boosts[:3] == [20, 20, 10] and set(boosts[3:]) == {0}
    assert await points(mesh, member) == 100 + 10 * 5 + 50
    # Next day (store-local) the cap is fresh.
    mesh.clock.advance(timedelta(days=1))
    nxt = await buy(mesh, member, [("boost", 500, 1)])
    assert by_rule(nxt.purchase)["boost"] == 20


async def test_concurrent_first_purchases_pay_the_welcome_bonus_once(mesh: Mesh) -> None:
    member = await new_member(mesh)
    results = await asyncio.gather(*(buy(mesh, member, [("misc", 1000, 1)]) for _ in range(8)))
    welcomed = [r.purchase.purchase_number for r in results if by_rule(r.purchase).get("welcome")]
    assert welcomed == [1]
    assert sorted(r.purchase.purchase_number for r in results) == list(range(1, 9))
    assert await points(mesh, member) == 8 * 10 + 100


async def test_a_weekend_doubles_and_the_app_triples_best_of(mesh: Mesh) -> None:
    member = await welcomed_member(mesh)
    saturday = datetime(2026, 1, 10, 10, 0, tzinfo=UTC)
    mesh.clock.set(saturday + timedelta(minutes=1))
    pos = await buy(mesh, member, [("misc", 2000, 1)], at=saturday)
    app = await buy(mesh, member, [("misc", 2000, 1)], at=saturday, channel="app", store="")
    assert by_rule(pos.purchase) == {"base": 20, "weekend-double": 20}
    assert by_rule(app.purchase) == {"base": 20, "weekend-app-triple": 40}


async def test_happy_hour_is_store_local_in_helsinki_not_lisbon_including_a_dst_day(mesh: Mesh) -> None:
    member = await welcomed_member(mesh)
    for instant in (datetime(2026, 1, 7, 16, 30, tzinfo=UTC), datetime(2026, 3, 29, 15, 30, tzinfo=UTC)):
        # 18:30 in Helsinki; 16:30 in Lisbon (winter UTC+2/UTC+0, and on 29 March UTC+3/UTC+1).
        mesh.clock.set(instant + timedelta(minutes=1))
        hel = await buy(mesh, member, [("misc", 1000, 1)], at=instant, store="HEL-01")
        lis = await buy(mesh, member, [("misc", 1000, 1)], at=instant, store="LIS-01")
        assert by_rule(hel.purchase).get("happy-hour") == 10, instant
        assert "happy-hour" not in by_rule(lis.purchase), instant
    # The day before the switch, 15:30Z is 17:30 in Helsinki: no happy hour.
    before = datetime(2026, 3, 28, 15, 30, tzinfo=UTC)
    mesh.clock.set(before + timedelta(minutes=1))
    hel = await buy(mesh, member, [("misc", 1000, 1)], at=before, store="HEL-01")
    assert "happy-hour" not in by_rule(hel.purchase)


async def test_yen_and_dinar_purchases_earn_exactly_the_documented_amounts(mesh: Mesh) -> None:
    member = await welcomed_member(mesh)
    yen = await buy(mesh, member, [("misc", 1000, 1)], currency="JPY")  # 1000 // 150 = 6
    dinar = await buy(mesh, member, [("misc", 1000, 1)], currency="KWD")  # 1.000 KWD -> 301 cents -> 3
    assert exact(yen.purchase) == {"points": 6}
    assert exact(dinar.purchase) == {"points": 3, "tier_credits": 3}
    assert dinar.purchase.fx_rate == "0.332"
    assert await points(mesh, member) == 100 + 6 + 3


async def test_tier_upgrades_on_the_crossing_purchase_and_multiplies_from_the_next(mesh: Mesh) -> None:
    member = await welcomed_member(mesh)
    one = await buy(mesh, member, [("misc", 25000, 1)])  # 250 credits, 250 + 20 big-basket points
    two = await buy(mesh, member, [("misc", 6000, 1)])  # 310 credits: silver from now on
    three = await buy(mesh, member, [("misc", 1000, 1)])
    assert (one.purchase.tier_before, one.purchase.tier_after) == ("blue", "blue")
    assert (two.purchase.tier_before, two.purchase.tier_after) == ("blue", "silver")
    assert by_rule(two.purchase) == {"base": 60}
    assert three.purchase.tier_before == "silver"
    assert by_rule(three.purchase) == {"base": 10, "silver": 10}


async def test_two_purchases_at_once_one_crossing_a_tier_price_the_other_at_the_tier_it_meets(mesh: Mesh) -> None:
    """The till and the web shop at the same moment: whichever is written second meets the
    upgrade the first made, so it earns silver's 2x; one tier change, not two."""
    for _ in range(3):
        member = await welcomed_member(mesh)
        await buy(mesh, member, [("misc", 25000, 1)])  # 250 credits: 50 short of silver
        at = mesh.clock.now()
        till, web = await asyncio.gather(
            mesh.ledger.stub.RecordPurchase(purchase_request(member, [("misc", 10000, 1)], at=at, channel="pos")),
            mesh.ledger.stub.RecordPurchase(purchase_request(member, [("misc", 10000, 1)], at=at, channel="web",
                                                             store="")),
        )  # fmt: skip
        first, second = sorted((till.purchase, web.purchase), key=lambda p: p.purchase_number)
        assert (first.tier_before, first.tier_after) == ("blue", "silver")
        assert (second.tier_before, second.tier_after) == ("silver", "silver")
        assert "silver" not in by_rule(first) and by_rule(second)["silver"] == by_rule(second)["base"] == 100
        assert exact(second)["points"] == exact(first)["points"] + 100


async def test_a_late_receipt_earns_under_the_program_live_at_its_receipt_time(mesh: Mesh) -> None:
    member = await welcomed_member(mesh)
    paid_at = mesh.clock.now() + timedelta(hours=1)
    mesh.clock.advance(timedelta(days=3))
    flash = PROGRAM.read_text().replace(
        "rules:\n", "rules:\n  - {id: flash, priority: 90, effect: {bonus_points: 7}}\n"
    )
    await mesh.rules.stub.PublishProgram(
        rules_pb2.PublishProgramRequest(idempotency_key=common_pb2.IdempotencyKey(key="v2"), document=flash)
    )
    late = await buy(mesh, member, [("misc", 1000, 1)], at=paid_at)
    fresh = await buy(mesh, member, [("misc", 1000, 1)])
    assert (late.purchase.program_version, by_rule(late.purchase)) == (1, {"base": 10})
    assert (fresh.purchase.program_version, by_rule(fresh.purchase)) == (2, {"base": 10, "flash": 7})
    too_late = mesh.clock.now() - timedelta(days=31)
    error = await rpc_error(buy(mesh, member, [("misc", 1000, 1)], at=too_late), grpc.StatusCode.FAILED_PRECONDITION)
    assert error_field(error) == "receipt_time"


async def test_replaying_a_receipt_returns_the_original_result(mesh: Mesh) -> None:
    member = await new_member(mesh)
    request = purchase_request(member, [("boost", 500, 1), ("misc", 1999, 2)], at=mesh.clock.now(), receipt="R-9")
    first = await mesh.ledger.stub.RecordPurchase(request)
    second = await mesh.ledger.stub.RecordPurchase(request)
    assert second.replayed and not first.replayed
    assert second.purchase == first.purchase
    assert await points(mesh, member) == sum(u.points for u in first.purchase.earned if u.unit == "points")


async def test_bad_baskets_get_precise_errors_and_write_nothing(mesh: Mesh) -> None:
    member = await new_member(mesh)
    now = mesh.clock.now()
    unknown_currency = purchase_request(member, [("misc", 100, 1)], at=now, currency="XXX", receipt="B-1")
    negative = purchase_request(member, [("misc", 100, 1)], at=now, receipt="B-1")
    negative.lines[0].quantity = -2
    wrong_sum = purchase_request(member, [("misc", 100, 1)], at=now, receipt="B-1")
    wrong_sum.total.amount_minor = 150
    no_zone = purchase_request(member, [("misc", 100, 1)], at=now, store="OSL-01", receipt="B-1")
    for request, field in (
        (unknown_currency, "total.currency"), (negative, "lines[0].quantity"),
        (wrong_sum, "total.amount_minor"), (no_zone, "store_id"),
    ):  # fmt: skip
        error = await rpc_error(mesh.ledger.stub.RecordPurchase(request), grpc.StatusCode.INVALID_ARGUMENT)
        assert error_field(error) == field
    assert await points(mesh, member) == 0
    # Nothing was claimed either: the corrected receipt earns normally.
    good = await buy(mesh, member, [("misc", 100, 1)], receipt="B-1", store="OSL-01".replace("OSL", "HEL"))
    assert good.purchase.status == EARNED and not good.replayed


async def test_tier_years_turn_at_the_programs_midnight_not_utcs(mesh: Mesh) -> None:
    """Helsinki is UTC+2: 00:30 on 1 January there is 22:30 on 31 December in UTC. That purchase
    starts the new qualification year, so the year before's credits no longer add up with it."""
    mesh.clock.set(datetime(2027, 1, 1, 6, 0, tzinfo=UTC))
    member = await welcomed_member(mesh)
    eve = await buy(mesh, member, [("misc", 25000, 1)], at=datetime(2026, 12, 31, 21, 30, tzinfo=UTC))
    new_year = await buy(mesh, member, [("misc", 6000, 1)], at=datetime(2026, 12, 31, 22, 30, tzinfo=UTC))
    assert exact(eve.purchase)["tier_credits"] == 250 and exact(new_year.purchase)["tier_credits"] == 60
    assert (new_year.purchase.tier_before, new_year.purchase.tier_after) == ("blue", "blue")


SECOND = "  - {id: second, priority: 55, when: {purchase_number: {equals: 2}}, effect: {bonus_points: 30}}\n"


async def test_a_second_purchase_sent_alongside_the_first_still_earns_the_second_purchase_bonus(mesh: Mesh) -> None:
    """A program pays 30 on the member's 2nd purchase. Two purchases of a new member sent at the
    same moment (the app and the till) are both quoted as purchase 1; the ledger numbers them in
    its write, and the one it numbers 2 is quoted again, so it earns the 2nd-purchase bonus as
    it would have sent after the first (the guards can cut a bonus a quote holds, not add one
    it left out)."""
    doc = PROGRAM.read_text().replace("rules:\n", "rules:\n" + SECOND)
    await mesh.rules.stub.PublishProgram(
        rules_pb2.PublishProgramRequest(idempotency_key=common_pb2.IdempotencyKey(key="v2-second"), document=doc)
    )
    for _ in range(3):
        member = await new_member(mesh)
        answers = await asyncio.gather(
            buy(mesh, member, [("misc", 1000, 1)], channel="pos"),
            buy(mesh, member, [("misc", 1000, 1)], channel="app", store=""),
        )
        first, second = sorted((a.purchase for a in answers), key=lambda p: p.purchase_number)
        assert (first.purchase_number, second.purchase_number) == (1, 2)
        assert (by_rule(first), by_rule(second)) == ({"base": 10, "welcome": 100}, {"base": 10, "second": 30})
        assert await points(mesh, member) == 150
