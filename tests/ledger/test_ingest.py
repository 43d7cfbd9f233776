"""IngestBatch over gRPC: a client stream of postings where bad items are reported by index and
the good ones post, each idempotent on its own key."""

from __future__ import annotations

from collections import defaultdict

import grpc

from pointmesh.v1 import ledger_pb2
from tests.conftest import LedgerUnderTest
from tests.ledger.helpers import (
    ABSENT_MEMBER,
    assert_books_balance,
    balance,
    create_member,
    earn,
    earn_item,
    entries,
    key,
    redeem_item,
)

BATCH_SIZE = 1000
MEMBERS = 20
NEGATIVE_AT = 7
ABSENT_AT = 500


def failures_of(response: ledger_pb2.IngestBatchResponse) -> list[tuple[int, str, str]]:
    return [(f.index, f.code, f.field) for f in response.failures]


def counts(response: ledger_pb2.IngestBatchResponse) -> tuple[int, int, int, int]:
    return (response.received, response.posted, response.replayed, response.failed)


async def test_batch_of_1000_earns_posts_good_items_reports_bad_ones_and_replays(ledger: LedgerUnderTest) -> None:
    members = [(await create_member(ledger.stub)).member_id for _ in range(MEMBERS)]
    expected: dict[str, int] = defaultdict(int)
    items: list[ledger_pb2.IngestBatchRequest] = []
    for i in range(BATCH_SIZE):
        member_id, points = members[i % MEMBERS], i % 7 + 1
        if i == NEGATIVE_AT:
            points = -5
        elif i == ABSENT_AT:
            member_id = ABSENT_MEMBER
        else:
            expected[member_id] += points
        items.append(
            ledger_pb2.IngestBatchRequest(
                earn=ledger_pb2.EarnRequest(
                    idempotency_key=key(f"pos-{i}", "store-42"), member_id=member_id, points=points
                )
            )
        )

    first = await ledger.stub.IngestBatch(iter(items), timeout=60)

    assert counts(first) == (1000, 998, 0, 2)
    assert failures_of(first) == [(NEGATIVE_AT, "INVALID_ARGUMENT", "points"), (ABSENT_AT, "NOT_FOUND", "member_id")]
    balances = {m: (await balance(ledger.stub, m)).balance_points for m in members}
    assert balances == dict(expected)
    assert sum(balances.values()) == sum(i % 7 + 1 for i in range(BATCH_SIZE)) - (NEGATIVE_AT % 7 + 1) - (
        ABSENT_AT % 7 + 1
    )

    again = await ledger.stub.IngestBatch(iter(items), timeout=60)

    assert counts(again) == (1000, 0, 998, 2)
    assert failures_of(again) == failures_of(first)
    assert {m: (await balance(ledger.stub, m)).balance_points for m in members} == balances
    await assert_books_balance(ledger)


async def test_batch_item_that_overdraws_fails_alone_while_the_others_post(ledger: LedgerUnderTest) -> None:
    alice = (await create_member(ledger.stub)).member_id
    bob = (await create_member(ledger.stub)).member_id
    carol = (await create_member(ledger.stub)).member_id
    funded = await earn(ledger.stub, alice, 100)
    await earn(ledger.stub, carol, 20)

    items = [
        earn_item("i0", bob, 50),
        redeem_item("i1", alice, 30),
        redeem_item("i2", carol, 1000),
        ledger_pb2.IngestBatchRequest(
            adjust=ledger_pb2.AdjustRequest(idempotency_key=key("i3"), member_id=alice, points=5, reason="late receipt")
        ),
        earn_item("i4", alice, 10),
        ledger_pb2.IngestBatchRequest(),
        ledger_pb2.IngestBatchRequest(
            reverse=ledger_pb2.ReverseRequest(
                idempotency_key=key("i6"), transaction_id=funded.transaction.transaction_id, points=20
            )
        ),
        earn_item("i4", alice, 11),
    ]

    response = await ledger.stub.IngestBatch(iter(items), timeout=60)

    assert counts(response) == (8, 5, 0, 3)
    assert failures_of(response) == [
        (2, "FAILED_PRECONDITION", "points"),
        (5, "INVALID_ARGUMENT", "operation"),
        (7, "ALREADY_EXISTS", "idempotency_key.key"),
    ]
    assert (await balance(ledger.stub, alice)).balance_points == 100 - 30 + 5 + 10 - 20
    assert (await balance(ledger.stub, bob)).balance_points == 50
    assert (await balance(ledger.stub, carol)).balance_points == 20
    await assert_books_balance(ledger)


async def test_batch_replays_items_already_posted_through_the_unary_rpc(ledger: LedgerUnderTest) -> None:
    member = (await create_member(ledger.stub)).member_id
    request = ledger_pb2.EarnRequest(idempotency_key=key("receipt-9", "pos"), member_id=member, points=40)
    await ledger.stub.Earn(request)

    response = await ledger.stub.IngestBatch(
        iter([ledger_pb2.IngestBatchRequest(earn=request), ledger_pb2.IngestBatchRequest(earn=request)]), timeout=60
    )

    assert counts(response) == (2, 0, 2, 0)
    assert (await balance(ledger.stub, member)).balance_points == 40


async def test_empty_batch_reports_nothing_received(ledger: LedgerUnderTest) -> None:
    response = await ledger.stub.IngestBatch(iter([]), timeout=60)
    assert counts(response) == (0, 0, 0, 0)
    assert list(response.failures) == []


async def test_batch_rejects_a_blocked_members_earn_by_index(ledger: LedgerUnderTest) -> None:
    active = (await create_member(ledger.stub)).member_id
    blocked = (await create_member(ledger.stub)).member_id
    await ledger.stub.BlockMember(ledger_pb2.BlockMemberRequest(idempotency_key=key(), member_id=blocked))

    response = await ledger.stub.IngestBatch(
        iter(
            [
                ledger_pb2.IngestBatchRequest(
                    earn=ledger_pb2.EarnRequest(idempotency_key=key(), member_id=m, points=15)
                )
                for m in (active, blocked, active)
            ]
        ),
        timeout=60,
    )

    assert counts(response) == (3, 2, 0, 1)
    assert failures_of(response) == [(1, grpc.StatusCode.FAILED_PRECONDITION.name, "member_id")]
    assert (await balance(ledger.stub, active)).balance_points == 30
    assert (await balance(ledger.stub, blocked)).balance_points == 0


async def test_pages_post_like_single_items_numbered_by_stream_position(ledger: LedgerUnderTest) -> None:
    """Pages and single items mix in one stream; failures carry the item's position in the
    flattened stream. A member's earns and a redemption spending them in the same chunk post
    in one write unit per shard, and every balance version, journal line and lot is the one
    the unary calls would have left."""
    members = [(await create_member(ledger.stub)).member_id for _ in range(6)]
    postings: dict[str, int] = defaultdict(int)
    expected: dict[str, int] = defaultdict(int)

    def earn_item(i: int, points: int) -> ledger_pb2.IngestBatchRequest:
        member_id = members[i % len(members)]
        if points > 0:
            postings[member_id] += 1
            expected[member_id] += points
        return ledger_pb2.IngestBatchRequest(
            earn=ledger_pb2.EarnRequest(idempotency_key=key(f"paged-{i}"), member_id=member_id, points=points)
        )

    first_page = [earn_item(i, 10 + i % 3) for i in range(250)]
    single = earn_item(250, 7)
    bad_at, nested_at = 291, 292
    nested = ledger_pb2.IngestBatchRequest(
        page=ledger_pb2.IngestPage(items=[ledger_pb2.IngestBatchRequest(earn=earn_item(nested_at, 0).earn)])
    )
    second_page = [earn_item(i, 0 if i == bad_at else 5) if i != nested_at else nested for i in range(251, 400)]
    spend = 100
    postings[members[0]] += 1
    expected[members[0]] -= spend
    second_page.append(
        ledger_pb2.IngestBatchRequest(
            redeem=ledger_pb2.RedeemRequest(idempotency_key=key("paged-spend"), member_id=members[0], points=spend)
        )
    )
    stream = [
        ledger_pb2.IngestBatchRequest(page=ledger_pb2.IngestPage(items=first_page)),
        single,
        ledger_pb2.IngestBatchRequest(page=ledger_pb2.IngestPage(items=second_page)),
    ]

    response = await ledger.stub.IngestBatch(iter(stream), timeout=60)

    assert counts(response) == (401, 399, 0, 2)
    assert failures_of(response) == [(bad_at, "INVALID_ARGUMENT", "points"), (nested_at, "INVALID_ARGUMENT", "page")]
    for member_id in members:
        got = await balance(ledger.stub, member_id)
        assert (got.balance_points, got.version) == (expected[member_id], postings[member_id])
        assert got.lifetime_earned_points == expected[member_id] + (spend if member_id == members[0] else 0)
        assert len(await entries(ledger.stub, member_id)) == postings[member_id]
    await assert_books_balance(ledger)

    again = await ledger.stub.IngestBatch(iter(stream), timeout=60)
    assert counts(again) == (401, 0, 399, 2)
    assert (await balance(ledger.stub, members[0])).balance_points == expected[members[0]]


async def test_one_members_long_run_posts_in_stream_order_around_the_items_that_fail(ledger: LedgerUnderTest) -> None:
    """120 earns and three redemptions of one member in one chunk: each redemption meets
    exactly the earns before it in the stream, a refused one fails alone, and on Cassandra the
    member's items go in runs small enough for one conditional batch."""
    member = (await create_member(ledger.stub)).member_id

    def earn_item(i: int) -> ledger_pb2.IngestBatchRequest:
        return ledger_pb2.IngestBatchRequest(
            earn=ledger_pb2.EarnRequest(idempotency_key=key(f"run-e{i}"), member_id=member, points=1)
        )

    def redeem_item(name: str, points: int) -> ledger_pb2.IngestBatchRequest:
        return ledger_pb2.IngestBatchRequest(
            redeem=ledger_pb2.RedeemRequest(idempotency_key=key(name), member_id=member, points=points)
        )

    items = [
        *(earn_item(i) for i in range(60)),
        redeem_item("run-r1", 100),  # 60 earned so far: refused
        *(earn_item(i) for i in range(60, 120)),
        redeem_item("run-r2", 100),  # 120 earned: posts
        redeem_item("run-r3", 30),  # 20 left: refused
    ]
    page = ledger_pb2.IngestBatchRequest(page=ledger_pb2.IngestPage(items=items))

    response = await ledger.stub.IngestBatch(iter([page]), timeout=120)

    assert counts(response) == (123, 121, 0, 2)
    assert failures_of(response) == [(60, "FAILED_PRECONDITION", "points"), (122, "FAILED_PRECONDITION", "points")]
    got = await balance(ledger.stub, member)
    assert (got.balance_points, got.lifetime_earned_points, got.version) == (20, 120, 121)
    await assert_books_balance(ledger)
