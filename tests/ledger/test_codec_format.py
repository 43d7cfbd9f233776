"""The ledger's JSON records across the switch to orjson: records written by either encoder read
back to the same value, and a request's fingerprint hashes the same text as before, so a retry
that crosses an upgrade replays instead of conflicting."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime

import pytest

from ledger_svc import codec
from ledger_svc.commands import Redeem, fingerprint
from ledger_svc.domain import IdemKey, Money
from ledger_svc.fraud_client import _screening
from ledger_svc.purchases import PurchaseRecord, PurchaseStatus
from ledger_svc.screening import ScreenerUnavailable, Screening, Verdict
from pointmesh.v1 import fraud_pb2

TEXT = "Geschenk für Müller ✓ 東京"


def _redeem() -> Redeem:
    return Redeem(key=IdemKey("pos", "k-1"), member_id="m-ü", unit="points", points=120,
                  business_time=datetime(2026, 12, 1, 10, 0, tzinfo=UTC), reference=TEXT)  # fmt: skip


def test_a_fingerprint_is_the_one_the_previous_encoder_recorded() -> None:
    # Recorded by the json-module encoder (commit 0fcae83) for this very command: idempotency
    # records stored before the switch hold it.
    assert fingerprint(_redeem()) == "7a695347aee6ca947e6e5d70cdea7f5c01db21e7eb1a4522bc1ee75d044f00b6"


def test_records_written_by_either_encoder_read_back_the_same() -> None:
    at = datetime(2026, 12, 1, 10, 0, 0, 123456, tzinfo=UTC)
    record = PurchaseRecord(
        purchase_id="p-1", member_id="m-ü", program="aurora", channel="store", store_id="Zürich-1",
        receipt_id=TEXT, total=Money(1_999, "EUR"), lines=(), receipt_time=at, received_at=at,
        status=PurchaseStatus.EARNED, earn_transactions={"points": "t-1"}, experiment_arms={"e": "b"},
        returned_points=(9_007_199_254_740_993,),  # past a double's exact integers
    )  # fmt: skip
    written = codec.dumps(record)
    assert codec.loads(PurchaseRecord, written) == record
    assert TEXT in written  # UTF-8 text, not \\u escapes
    before = json.dumps(codec.to_plain(record), separators=(",", ":"), sort_keys=True)  # what older versions wrote
    assert codec.loads(PurchaseRecord, before) == record
    assert json.loads(written) == json.loads(before)


@pytest.mark.parametrize("score", [math.nan, math.inf, -math.inf])
def test_a_score_that_is_no_finite_number_counts_as_fraud_svc_unavailable(score: float) -> None:
    """orjson would write it into the purchase's record as null (the json module wrote NaN,
    which is not JSON): the policy decides instead, as for any answer fraud_svc cannot give."""
    assert _screening(fraud_pb2.ScoreResponse(verdict=fraud_pb2.VERDICT_REVIEW, score=0.75)).score == 0.75
    with pytest.raises(ScreenerUnavailable, match="score"):
        _screening(fraud_pb2.ScoreResponse(verdict=fraud_pb2.VERDICT_REVIEW, score=score))


def test_a_non_finite_number_the_json_module_wrote_still_reads_back() -> None:
    """Records stored before orjson may hold NaN (a fraud score): orjson alone refuses them."""
    before = json.dumps({"verdict": "ALLOW", "scored": True, "score": math.nan}, separators=(",", ":"))
    assert math.isnan(codec.loads(Screening, before).score)
    assert codec.loads(Screening, codec.dumps(Screening(Verdict.ALLOW, True, 0.5))).score == 0.5
