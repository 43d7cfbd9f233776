"""The feature vector: what each window counts, what is missing, and one code path."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from fraud_svc.domain import BadRequest, TxContext, TxKind
from fraud_svc.features import FEATURE_INDEX, FEATURE_NAMES, FeatureRow, featurize, featurize_matrix
from fraud_svc.synth import SynthConfig, generate
from fraud_svc.velocity import MemoryVelocity

T0 = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)


def tx(n: int, kind: TxKind = TxKind.PURCHASE, minutes: float = 0, **fields: object) -> TxContext:
    base: dict[str, object] = {
        "event_id": f"e{n}", "kind": kind, "member_id": "m1", "occurred_at": T0 + timedelta(minutes=minutes),
        "channel": "web", "amount_minor": 500, "currency": "EUR", "device_id": "phone-1", "ip": "10.0.0.1",
        "card_hash": "card-1", "member_since": T0 - timedelta(days=400), "balance_points": 1000,
    }  # fmt: skip
    base.update(fields)
    return TxContext(**base)  # type: ignore[arg-type]


def test_feature_names_are_unique_and_indexed() -> None:
    assert len(set(FEATURE_NAMES)) == len(FEATURE_NAMES) == len(FEATURE_INDEX)
    assert all(FEATURE_NAMES[i] == name for name, i in FEATURE_INDEX.items())


async def test_a_burst_of_purchases_counts_each_one_including_itself() -> None:
    velocity = MemoryVelocity()
    rows = [await featurize(tx(i, minutes=i, amount_minor=100 * (i + 1)), velocity) for i in range(5)]
    last = rows[-1]
    assert [r["member_purchases_10m"] for r in rows] == [1, 2, 3, 4, 5]
    assert last["card_events_10m"] == 5 and last["device_events_10m"] == 5
    assert last["member_purchase_amount_1h"] == 100 + 200 + 300 + 400 + 500
    assert last["member_hours_since_last_event"] == pytest.approx(1 / 60)
    assert rows[0]["member_device_age_hours"] == 0 and last["member_device_age_hours"] == pytest.approx(4 / 60)
    assert last["card_members_24h"] == 1


async def test_what_a_transaction_does_not_have_is_missing_not_zero() -> None:
    row = await featurize(
        tx(1, channel="pos", device_id="", ip="", store_id="s1", employee_card="e1", member_since=None),
        MemoryVelocity(),
    )
    for name in ("device_events_10m", "ip_members_24h", "member_device_age_hours", "tenure_days",
                 "contact_change_age_hours", "points_share_of_balance", "recipient_transfers_in_24h"):  # fmt: skip
        assert math.isnan(row[name]), name
    assert row["employee_events_24h"] == 1 and row["channel_pos"] == 1


async def test_transfers_count_on_the_recipient_and_feed_its_later_redemption() -> None:
    velocity = MemoryVelocity()
    await featurize(tx(1, TxKind.TRANSFER, 0, member_id="a", counterparty_member_id="c", points=300), velocity)
    second = await featurize(tx(2, TxKind.TRANSFER, 5, member_id="b", counterparty_member_id="c", points=400), velocity)
    assert second["recipient_transfer_senders_7d"] == 2 and second["recipient_transfers_in_24h"] == 2
    assert second["member_transfers_out_24h"] == 1
    redeem = await featurize(
        tx(3, TxKind.REDEMPTION, 30, member_id="c", points=650, balance_points=700, card_hash=""), velocity
    )
    assert redeem["member_transfer_in_points_24h"] == 700
    assert redeem["transfer_in_share_of_balance_24h"] == pytest.approx(1.0)
    assert redeem["points_share_of_balance"] == pytest.approx(650 / 700)


async def test_contact_change_age_and_new_device_describe_a_takeover() -> None:
    velocity = MemoryVelocity()
    await featurize(tx(1, minutes=0), velocity)
    takeover = tx(2, TxKind.REDEMPTION, 60 * 24 * 3, device_id="attacker", ip="203.0.113.9", card_hash="",
                  points=950, contact_changed_at=T0 + timedelta(days=3) - timedelta(hours=2))  # fmt: skip
    row = await featurize(takeover, velocity)
    assert row["contact_change_age_hours"] == pytest.approx(2.0)
    assert row["member_device_age_hours"] == 0 and row["member_new_devices_30d"] == 2
    assert row["member_ip_age_hours"] == 0 and row["points_share_of_balance"] == pytest.approx(0.95)


async def test_a_return_at_a_store_never_bought_at_has_no_store_age() -> None:
    velocity = MemoryVelocity()
    await featurize(tx(1, channel="pos", store_id="s1", device_id="", ip=""), velocity)
    home = await featurize(tx(2, TxKind.RETURN, 60, channel="pos", store_id="s1", device_id="", ip=""), velocity)
    away = await featurize(tx(3, TxKind.RETURN, 90, channel="pos", store_id="s9", device_id="", ip=""), velocity)
    assert home["member_store_age_days"] == pytest.approx(1 / 24) and math.isnan(away["member_store_age_days"])
    assert away["member_return_stores_7d"] == 2 and away["member_returns_7d"] == 2


async def test_a_naive_timestamp_is_refused() -> None:
    with pytest.raises(BadRequest) as refused:
        await featurize(tx(1, occurred_at=datetime(2026, 3, 2, 12, 0)), MemoryVelocity())
    assert refused.value.field == "occurred_at"


async def test_offline_matrix_and_online_featurize_are_the_same_code_path() -> None:
    events = list(generate(SynthConfig.for_rows(5_000, seed=41)).contexts())[:1_500]
    matrix = featurize_matrix(events)
    velocity = MemoryVelocity()
    online = np.asarray([(await featurize(ctx, velocity)).values for ctx in events])
    assert matrix.shape == (len(events), len(FEATURE_NAMES))
    assert np.array_equal(matrix, online, equal_nan=True)
    row = FeatureRow(tuple(matrix[-1].tolist()))
    assert list(row.as_dict()) == list(FEATURE_NAMES)
