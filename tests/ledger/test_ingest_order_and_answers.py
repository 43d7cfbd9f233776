"""IngestBatch keeps each member's items in stream order when a stream is resent after an
outage, answers an unavailable store as UNAVAILABLE, lists a bounded answer for a long stream,
and counts a replayed item as replayed whichever path runs it. The outages are the real store
made to raise StoreClosed, as a ledger shutting down does."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest

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
