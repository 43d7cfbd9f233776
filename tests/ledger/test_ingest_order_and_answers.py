"""IngestBatch keeps each member's items in stream order when a stream is resent after an
outage, answers an unavailable store as UNAVAILABLE, lists a bounded answer for a long stream,
and counts a replayed item as replayed whichever path runs it. The outages are the real store
made to raise StoreClosed, as a ledger shutting down does."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from ledger_svc.ingest import BatchIngest
from ledger_svc.store.base import StoreClosed
from pointmesh.v1 import ledger_pb2
from tests.conftest import LedgerUnderTest
from tests.ledger.helpers import balance, create_member, earn_item, key, redeem_item


@contextlib.contextmanager
def writes_refused(ledger: LedgerUnderTest) -> Iterator[None]:
    """The store's shard writes fail as a closing store's do, until the block ends."""
    store = ledger.app.store
    real_write = store.write

    async def closed(shard: int, work: object) -> None:
        raise StoreClosed("the store is closing")

    store.write = closed  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        store.write = real_write  # type: ignore[method-assign]


async def test_retried_batch_after_store_outage_keeps_member_order(ledger: LedgerUnderTest) -> None:
    """A batch cut short by a store outage (a shutdown mid-batch) is sent again as it was: the
    redeem after the earn it needs must post, as it does on a first attempt."""
    alice = (await create_member(ledger.stub)).member_id
    items = [earn_item("e1", alice, 100), redeem_item("r1", alice, 100)]
    with writes_refused(ledger):
        first = await ledger.stub.IngestBatch(iter(items), timeout=30)
    assert [f.code for f in first.failures] == ["UNAVAILABLE", "UNAVAILABLE"]

    again = await ledger.stub.IngestBatch(iter(items), timeout=30)

    assert [(f.index, f.code, f.field, f.message) for f in again.failures] == []
    assert (again.posted, again.failed) == (2, 0)
    assert (await balance(ledger.stub, alice)).balance_points == 0


async def test_ingest_batch_answers_unavailable_when_the_store_is_closing(ledger: LedgerUnderTest) -> None:
    """Unary Earn answers UNAVAILABLE (retry later) when the store is closing; IngestBatch must too,
    not UNKNOWN (which clients and the gateway treat as a bug, not a retryable outage)."""
    import grpc

    alice = (await create_member(ledger.stub)).member_id
    store = ledger.app.store
    real = store.write_directory

    async def closed(work):  # type: ignore[no-untyped-def]
        raise StoreClosed("directory")

    store.write_directory = closed  # type: ignore[method-assign]
    try:
        with pytest.raises(grpc.aio.AioRpcError) as unary:
            await ledger.stub.Earn(ledger_pb2.EarnRequest(idempotency_key=key("u1"), member_id=alice, points=5))
        with pytest.raises(grpc.aio.AioRpcError) as batch:
            await ledger.stub.IngestBatch(iter([earn_item("b1", alice, 5)]), timeout=30)
    finally:
        store.write_directory = real  # type: ignore[method-assign]
    assert unary.value.code() == grpc.StatusCode.UNAVAILABLE
    assert (batch.value.code(), batch.value.details()) == (
        grpc.StatusCode.UNAVAILABLE,
        "directory: the ledger store is closed",
    )


async def test_a_long_stream_gets_its_per_item_answer(ledger: LedgerUnderTest) -> None:
    """IngestBatch is for bulk runs: the response lists one entry per failed item (and per
    purchase), all held until the stream ends, so a long enough stream has an answer larger
    than gRPC's 16 MiB message limit and the client gets no answer at all. 200,000 items that
    each fail (no operation set) stand in for ~300,000 purchases (52 bytes of answer each)."""
    n, page = 200_000, 5_000
    pages = [
        ledger_pb2.IngestBatchRequest(page=ledger_pb2.IngestPage(items=[ledger_pb2.IngestBatchRequest()] * page))
        for _ in range(n // page)
    ]
    response = await ledger.stub.IngestBatch(iter(pages), timeout=300)
    assert (response.received, response.failed) == (n, n)
    assert response.truncated and 50_000 < len(response.failures) < n
    assert [f.index for f in response.failures] == list(range(len(response.failures)))


async def test_failures_quoting_whole_rows_still_get_an_answer(ledger: LedgerUnderTest) -> None:
    """A feed with a whole row (900 characters) in its member id column: each failure's message
    quotes it, so the answer is bounded by size, not by a count of entries."""
    row = "m_" + "x" * 900
    n, page = 20_000, 1_000
    pages = [
        ledger_pb2.IngestBatchRequest(page=ledger_pb2.IngestPage(items=[
            ledger_pb2.IngestBatchRequest(earn=ledger_pb2.EarnRequest(
                idempotency_key=key(f"k{p}-{i}"), member_id=row, points=5)) for i in range(page)
        ]))
        for p in range(n // page)
    ]  # fmt: skip
    response = await ledger.stub.IngestBatch(iter(pages), timeout=300)
    assert (response.received, response.failed) == (n, n)
    assert response.truncated and response.failures[0].field == "member_id"


async def test_resumed_stream_keeps_member_order_across_an_item_claimed_before(ledger: LedgerUnderTest) -> None:
    """A stream cut short by a store outage (a ledger shutting down) after its keys were
    claimed, resent from the failed items on with the rest of the file: the earn claimed
    before must still post before the redemption that follows it (as on a first attempt)."""
    alice = (await create_member(ledger.stub)).member_id
    with writes_refused(ledger):
        first = await ledger.stub.IngestBatch(iter([earn_item("e9", alice, 100)]), timeout=30)
    assert [f.code for f in first.failures] == ["UNAVAILABLE"]

    resumed = await ledger.stub.IngestBatch(
        iter([earn_item("e9", alice, 100), redeem_item("r9", alice, 100)]), timeout=30
    )

    assert [(f.index, f.code, f.field) for f in resumed.failures] == []
    assert (await balance(ledger.stub, alice)).balance_points == 0


async def test_replayed_batch_reports_a_merged_members_reversal_as_replayed(ledger: LedgerUnderTest) -> None:
    """The same batch sent twice: its second answer must count every item as replayed. A
    reversal of an earn of a member merged away since is counted as posted again."""
    from tests.ledger.helpers import earn

    source = (await create_member(ledger.stub)).member_id
    target = (await create_member(ledger.stub)).member_id
    tx = (await earn(ledger.stub, source, 100)).transaction.transaction_id
    await ledger.stub.MergeMembers(
        ledger_pb2.MergeMembersRequest(idempotency_key=key(), source_member_id=source, target_member_id=target)
    )
    items = [
        ledger_pb2.IngestBatchRequest(
            reverse=ledger_pb2.ReverseRequest(
                idempotency_key=key("rev-1"), transaction_id=tx, points=30, reason="return"
            )
        ),
        earn_item("e-after", target, 5),
    ]

    first = await ledger.stub.IngestBatch(iter(items), timeout=30)
    assert (first.posted, first.replayed, first.failed) == (2, 0, 0)
    again = await ledger.stub.IngestBatch(iter(items), timeout=30)

    assert (await balance(ledger.stub, target)).balance_points == 100 - 30 + 5  # posted once
    assert (again.posted, again.replayed, again.failed) == (0, 2, 0)


@pytest.mark.parametrize("path", ["unary", "batch"])
async def test_a_refused_redemption_corrected_under_its_key_later_in_the_stream_posts(
    ledger: LedgerUnderTest, path: str
) -> None:
    """decisions/0004: a request refused before it wrote anything gives its key back, over a
    single request or IngestBatch alike. The correction later in the same stream was answered
    ALREADY_EXISTS: its key was judged taken before the first item's outcome was known."""
    member = (await create_member(ledger.stub)).member_id
    await ledger.stub.Earn(earn_item("float-1", member, 500).earn)
    too_much, corrected = redeem_item("refund-77", member, 1000), redeem_item("refund-77", member, 100)
    if path == "unary":
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await ledger.stub.Redeem(too_much.redeem)
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        await ledger.stub.Redeem(corrected.redeem)
    else:
        response = await ledger.stub.IngestBatch(iter([too_much, corrected]), timeout=60)
        assert [(f.index, f.code) for f in response.failures] == [(0, "FAILED_PRECONDITION")]
        assert (response.posted, response.failed) == (1, 1)
    assert (await balance(ledger.stub, member)).balance_points == 400


async def test_a_correction_after_an_item_that_posted_under_its_key_is_a_conflict(ledger: LedgerUnderTest) -> None:
    member = (await create_member(ledger.stub)).member_id
    await ledger.stub.Earn(earn_item("float-2", member, 500).earn)
    stream = [redeem_item("refund-78", member, 100), redeem_item("refund-78", member, 50)]
    response = await ledger.stub.IngestBatch(iter(stream), timeout=60)
    assert [(f.index, f.code) for f in response.failures] == [(1, "ALREADY_EXISTS")]
    assert (await balance(ledger.stub, member)).balance_points == 400


@pytest.mark.parametrize("path", ["unary", "batch"])
async def test_a_resent_streams_redemption_is_written_before_the_reversal_behind_it(
    ledger: LedgerUnderTest, path: str
) -> None:
    """A member with an item claimed before (a resent stream) has its items run in stream
    order; a reversal names a transaction, not a member, so it ran with the first-time items
    ahead of the member's redemption, which then lacked the points it has one by one."""
    member = (await create_member(ledger.stub)).member_id
    first = earn_item("shift-1", member, 100)
    await ledger.stub.Earn(first.earn)  # the part of the stream that got through before the outage
    later = await ledger.stub.Earn(earn_item("shift-0", member, 100).earn)
    stream = [
        first,
        redeem_item("spend-1", member, 200),
        ledger_pb2.IngestBatchRequest(reverse=ledger_pb2.ReverseRequest(
            idempotency_key=key("void-shift-0"), transaction_id=later.transaction.transaction_id, full=True,
            reason="voided shift",
        )),
    ]  # fmt: skip
    if path == "unary":
        await ledger.stub.Redeem(stream[1].redeem)
        await ledger.stub.Reverse(stream[2].reverse)
    else:
        response = await ledger.stub.IngestBatch(iter(stream), timeout=60)
        assert [(f.index, f.code, f.message) for f in response.failures] == []
        assert (response.replayed, response.posted) == (1, 2)
    after = await balance(ledger.stub, member)
    assert (after.balance_points, after.debt_points) == (0, 100)  # spent, then the reversal's debt


async def test_a_redemption_refused_in_a_cancelled_stream_leaves_its_key_free(
    ledger: LedgerUnderTest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The client gave up mid-chunk, answered nothing; the refused redemption's key stayed
    claimed, so the resent stream found it claimed before and kept it: the corrected
    redemption was ALREADY_EXISTS for the key's whole retention."""
    alice = (await create_member(ledger.stub)).member_id
    carol = (await create_member(ledger.stub)).member_id
    await ledger.stub.Earn(earn_item("alice-float", alice, 500).earn)
    resent = earn_item("carol-shift-1", carol, 10)
    await ledger.stub.Earn(resent.earn)  # claimed before: the stream is a resend
    stream = [redeem_item("alice-spend-1", alice, 1000), resent]
    svc = ledger.app.service
    reached = asyncio.Event()

    async def stalls(*args: object, **kwargs: object) -> object:
        reached.set()
        await asyncio.sleep(3600)
        raise AssertionError

    settled = asyncio.Event()
    give_back = BatchIngest._give_back_refused

    async def settling(self: BatchIngest, *args: Any) -> None:
        await give_back(self, *args)
        settled.set()

    original = svc._stored_result
    monkeypatch.setattr(svc, "_stored_result", stalls)
    monkeypatch.setattr(BatchIngest, "_give_back_refused", settling)
    call = ledger.stub.IngestBatch(iter(stream), timeout=60)
    await asyncio.wait_for(reached.wait(), 10)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    await asyncio.wait_for(settled.wait(), 10)  # the server has seen the cancel
    monkeypatch.setattr(svc, "_stored_result", original)

    again = await ledger.stub.IngestBatch(iter(stream), timeout=60)
    assert [(f.index, f.code) for f in again.failures] == [(0, "FAILED_PRECONDITION")]
    await ledger.stub.Redeem(redeem_item("alice-spend-1", alice, 100).redeem)
    assert (await balance(ledger.stub, alice)).balance_points == 400


async def test_a_redemption_refused_while_another_write_of_the_stream_is_cut_off_leaves_its_key_free(
    ledger: LedgerUnderTest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same with the cancel arriving while first-time items are written: the outcomes of
    the writes that finished were known only once all had, so none was given back."""
    svc = ledger.app.service
    alice = (await create_member(ledger.stub)).member_id
    carol = (await create_member(ledger.stub)).member_id
    while svc.shard_of(carol) == svc.shard_of(alice):
        carol = (await create_member(ledger.stub)).member_id
    await ledger.stub.Earn(earn_item("alice-float-2", alice, 500).earn)
    stream = [redeem_item("alice-spend-2", alice, 1000), earn_item("carol-shift-2", carol, 10)]
    reached, alice_written, settled = asyncio.Event(), asyncio.Event(), asyncio.Event()
    group, give_back = BatchIngest._group, BatchIngest._give_back_refused

    async def stalls_for_carol(self: BatchIngest, shard: int, items: list[Any]) -> list[tuple[int, Any]]:
        if any(getattr(p.command, "member_id", "") == carol for p in items):
            reached.set()
            await asyncio.sleep(3600)
        done = await group(self, shard, items)
        alice_written.set()
        return done

    async def settling(self: BatchIngest, *args: Any) -> None:
        await give_back(self, *args)
        settled.set()

    monkeypatch.setattr(BatchIngest, "_group", stalls_for_carol)
    monkeypatch.setattr(BatchIngest, "_give_back_refused", settling)
    call = ledger.stub.IngestBatch(iter(stream), timeout=60)
    await asyncio.wait_for(asyncio.gather(reached.wait(), alice_written.wait()), 10)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    await asyncio.wait_for(settled.wait(), 10)
    monkeypatch.setattr(BatchIngest, "_group", group)

    await ledger.stub.Redeem(redeem_item("alice-spend-2", alice, 100).redeem)
    assert (await balance(ledger.stub, alice)).balance_points == 400


@pytest.mark.parametrize("path", ["unary", "batch"])
async def test_a_redemption_sent_twice_and_refused_both_times_gives_its_key_back(
    ledger: LedgerUnderTest, path: str
) -> None:
    """decisions/0004: a request refused before it wrote anything gives its claim back, over a
    single request or IngestBatch alike. A feed with the same redemption line twice (both refused
    for too few points) gives the key back too: the corrected redemption, in the same stream or
    sent later, posts under it."""
    member = (await create_member(ledger.stub)).member_id
    await ledger.stub.Earn(earn_item("float-9", member, 500).earn)
    too_much, corrected = redeem_item("refund-99", member, 1000), redeem_item("refund-99", member, 100)
    if path == "unary":
        for _ in range(2):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await ledger.stub.Redeem(too_much.redeem)
            assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        await ledger.stub.Redeem(corrected.redeem)
    else:
        response = await ledger.stub.IngestBatch(iter([too_much, too_much, corrected]), timeout=60)
        assert [(f.index, f.code) for f in response.failures] == [(0, "FAILED_PRECONDITION"),
                                                                  (1, "FAILED_PRECONDITION")]  # fmt: skip
    assert (await balance(ledger.stub, member)).balance_points == 400


async def test_a_duplicated_refused_redemption_in_a_batch_leaves_its_key_for_the_correction(
    ledger: LedgerUnderTest,
) -> None:
    member = (await create_member(ledger.stub)).member_id
    await ledger.stub.Earn(earn_item("float-10", member, 500).earn)
    too_much = redeem_item("refund-100", member, 1000)
    response = await ledger.stub.IngestBatch(iter([too_much, too_much]), timeout=60)
    assert [(f.index, f.code) for f in response.failures] == [(0, "FAILED_PRECONDITION"), (1, "FAILED_PRECONDITION")]
    await ledger.stub.Redeem(redeem_item("refund-100", member, 100).redeem)
    assert (await balance(ledger.stub, member)).balance_points == 400


@pytest.mark.parametrize("path", ["unary", "batch"])
async def test_a_merged_members_reversal_ahead_of_the_heirs_redemption_is_written_first(
    ledger: LedgerUnderTest, path: str
) -> None:
    """The points of the merged-away member's earn live with the heir now. Reversing that earn,
    then the heir redeeming, one by one: the reversal takes the points, the redemption is refused.
    In a batch the reversal keeps its place among the heir's items (the items of the member it
    takes from), so the redemption behind it is refused there too, and no debt is left."""
    gone = (await create_member(ledger.stub)).member_id
    heir = (await create_member(ledger.stub)).member_id
    funded = await ledger.stub.Earn(earn_item(f"gone-earn-{path}", gone, 100).earn)
    await ledger.stub.MergeMembers(
        ledger_pb2.MergeMembersRequest(idempotency_key=key(), source_member_id=gone, target_member_id=heir)
    )
    assert (await balance(ledger.stub, heir)).balance_points == 100
    reverse = ledger_pb2.IngestBatchRequest(
        reverse=ledger_pb2.ReverseRequest(
            idempotency_key=key(), transaction_id=funded.transaction.transaction_id, full=True, reason="chargeback"
        )
    )
    spend = redeem_item(f"heir-spend-{path}", heir, 100)
    if path == "unary":
        await ledger.stub.Reverse(reverse.reverse)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await ledger.stub.Redeem(spend.redeem)
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    else:
        response = await ledger.stub.IngestBatch(iter([reverse, spend]), timeout=60)
        assert [(f.index, f.code) for f in response.failures] == [(1, "FAILED_PRECONDITION")]
    got = await balance(ledger.stub, heir)
    assert (got.balance_points, got.debt_points) == (0, 0)
