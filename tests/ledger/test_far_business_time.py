"""An earn dated so late that the program's default expiry would pass year 9999 is refused on
its business_time before anything is claimed or written, alone in a batch."""

from __future__ import annotations

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from pointmesh.v1 import ledger_pb2
from tests.conftest import LedgerUnderTest
from tests.ledger.helpers import balance, create_member, error_field, key, rpc_error

LAST_SECOND = Timestamp(seconds=253402300799)  # 9999-12-31T23:59:59Z


async def test_an_earn_whose_default_expiry_would_pass_year_9999_is_refused_on_its_business_time(
    ledger: LedgerUnderTest,
) -> None:
    member = (await create_member(ledger.stub)).member_id
    late = ledger_pb2.EarnRequest(idempotency_key=key("late-1"), member_id=member, points=7, business_time=LAST_SECOND)

    error = await rpc_error(ledger.stub.Earn(late), grpc.StatusCode.INVALID_ARGUMENT)

    assert error_field(error) == "business_time" and "9999" in (error.details() or "")
    fixed = ledger_pb2.EarnRequest(idempotency_key=key("late-1"), member_id=member, points=7)
    assert (await ledger.stub.Earn(fixed)).transaction.points == 7  # the refused call claimed no key


async def test_in_a_batch_the_late_earn_is_reported_alone_and_the_good_one_posts(ledger: LedgerUnderTest) -> None:
    member = (await create_member(ledger.stub)).member_id
    items = [
        ledger_pb2.IngestBatchRequest(earn=ledger_pb2.EarnRequest(idempotency_key=key("ok"), member_id=member, points=7)),
        ledger_pb2.IngestBatchRequest(earn=ledger_pb2.EarnRequest(idempotency_key=key("late"), member_id=member,
                                                                  points=5, business_time=LAST_SECOND)),
    ]  # fmt: skip

    summary = await ledger.stub.IngestBatch(iter(items), timeout=60)

    assert (summary.posted, summary.failed) == (1, 1)
    assert [(f.index, f.code, f.field) for f in summary.failures] == [(1, "INVALID_ARGUMENT", "business_time")]
    assert (await balance(ledger.stub, member)).balance_points == 7
