"""The generator: deterministic, sized as asked, and its patterns mean what they say."""

from __future__ import annotations

from datetime import timedelta

import numpy as np
import pytest

from fraud_svc.domain import TxKind
from fraud_svc.synth import FRAUD_PATTERNS, PATTERNS, SynthConfig, SynthData, generate

HOUR_MS = 3_600_000


@pytest.fixture(scope="module")
def data() -> SynthData:
    return generate(SynthConfig.for_rows(60_000, seed=7))


def test_same_seed_gives_identical_events_and_churn_set(data: SynthData) -> None:
    again = generate(SynthConfig.for_rows(60_000, seed=7))
    for name in ("t_ms", "kind", "member", "amount_minor", "points", "balance_points", "device", "ip", "card",
                 "employee", "counterparty", "contact_changed_ms", "pattern", "label"):  # fmt: skip
        assert np.array_equal(getattr(data, name), getattr(again, name)), name
    assert list(data.events())[-500:] == list(again.events())[-500:]
    assert data.churn.activities == again.churn.activities
    assert np.array_equal(data.churn.churned, again.churn.churned)


def test_another_seed_gives_other_events(data: SynthData) -> None:
    other = generate(SynthConfig.for_rows(60_000, seed=8))
    assert len(other) != len(data) or not np.array_equal(other.t_ms, data.t_ms)


@pytest.mark.parametrize("rows", [10_000, 150_000])
def test_size_follows_the_requested_rows(rows: int) -> None:
    assert abs(len(generate(SynthConfig.for_rows(rows, seed=1))) / rows - 1) < 0.15


def test_events_are_in_event_time_order_with_unique_ids(data: SynthData) -> None:
    assert np.all(np.diff(data.t_ms) >= 0)
    contexts = list(data.contexts())
    assert len({c.event_id for c in contexts}) == len(contexts)
    assert all(c.member_since is not None and c.member_since <= c.occurred_at for c in contexts[::97])


def test_every_fraud_pattern_and_benign_lookalike_is_present(data: SynthData) -> None:
    counts = dict(zip(*np.unique(data.pattern_names(), return_counts=True), strict=True))
    assert set(PATTERNS) <= set(counts), set(PATTERNS) - set(counts)
    fraud_share = sum(counts[p] for p in FRAUD_PATTERNS) / len(data)
    assert 0.005 < fraud_share < 0.05


def test_labels_follow_the_patterns_up_to_the_configured_noise(data: SynthData) -> None:
    fraud = np.isin(data.pattern_names(), sorted(FRAUD_PATTERNS))
    assert 0.9 < data.label[fraud].mean() < 1.0  # label_noise of 2%: some fraud goes unreported
    assert 0 < data.label[~fraud].mean() < 0.002  # benign_noise: a few genuine rows are disputed


def test_the_replayed_ledger_never_redeems_or_transfers_more_than_the_balance(data: SynthData) -> None:
    spend = np.isin(data.kind, [1, 2])
    assert np.all(data.points[spend] <= data.balance_points[spend])
    assert np.all(data.points[spend] > 0)
    assert np.all(data.points[data.kind == 0] == data.amount_minor[data.kind == 0] // 100)


def test_account_takeover_redemptions_follow_a_fresh_contact_change_on_an_unknown_device(data: SynthData) -> None:
    ato = data.is_pattern("account_takeover") & (data.kind == 1)
    victims = ato & (data.member < data.config.members)  # not the mules' redemptions
    since_change = data.t_ms[victims] - data.contact_changed_ms[victims]
    recent = (data.contact_changed_ms[victims] >= 0) & (since_change <= 7 * HOUR_MS)
    assert recent.mean() > 0.6  # 92% of takeovers change the contact; a small sample here
    own_devices = set(data.device[~data.is_pattern("account_takeover") & (data.kind == 0)].tolist())
    assert not set(data.device[ato].tolist()) & own_devices


def test_new_phone_lookalikes_are_large_redemptions_on_a_new_device(data: SynthData) -> None:
    phone = data.is_pattern("new_phone")
    assert (data.kind[phone] == 1).all()
    assert np.median(data.points[phone] / data.balance_points[phone]) > 0.7


def test_churned_members_buy_nothing_after_as_of_and_aggregates_match_the_events(data: SynthData) -> None:
    churn = data.churn
    as_of_ms = int(churn.as_of.timestamp() * 1000)
    buys = data.kind == 0
    for activity, churned in list(zip(churn.activities, churn.churned.tolist(), strict=True))[:300]:
        member = int(activity.member_id[1:])
        mine = buys & (data.member == member)
        later = mine & (data.t_ms > as_of_ms) & (data.t_ms <= as_of_ms + 90 * 24 * HOUR_MS)
        assert churned == (not later.any())
        window = mine & (data.t_ms <= as_of_ms) & (data.t_ms > as_of_ms - 90 * 24 * HOUR_MS)
        assert activity.purchases_90d == int(window.sum())
        assert activity.spend_90d_minor == int(data.amount_minor[window].sum())
    assert 0.05 < churn.churned.mean() < 0.5


def test_contexts_carry_what_the_ledger_sends(data: SynthData) -> None:
    by_kind = {k: next(c for c in data.contexts() if c.kind is k) for k in TxKind}
    assert by_kind[TxKind.TRANSFER].counterparty_member_id
    assert by_kind[TxKind.PURCHASE].amount_minor > 0 and by_kind[TxKind.PURCHASE].currency == "EUR"
    pos = next(c for c in data.contexts() if c.channel == "pos" and c.kind is TxKind.PURCHASE)
    assert pos.store_id and pos.employee_card and not pos.device_id
    assert all(c.occurred_at.utcoffset() == timedelta(0) for c in list(data.contexts())[:100])
