"""When the ledger's retention and archive passes run: every six hours, and after a failure a
retry that backs off (a failing pass used to be repeated every few seconds)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from ledger_svc.app import PURGE_EVERY, RETRY_FIRST, Periodic

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def test_a_pass_is_due_every_period_after_its_last_success() -> None:
    job = Periodic(T0, PURGE_EVERY)

    assert not job.due(T0 + PURGE_EVERY - timedelta(seconds=1))
    assert job.due(T0 + PURGE_EVERY)
    job.succeeded(T0 + PURGE_EVERY)
    assert not job.due(T0 + 2 * PURGE_EVERY - timedelta(seconds=1))


def test_a_failing_pass_is_retried_after_a_doubling_wait_capped_at_the_period() -> None:
    job = Periodic(T0, PURGE_EVERY)
    now = T0 + PURGE_EVERY
    waits = []
    for _ in range(12):
        wait = job.failed(now)
        assert not job.due(now + wait - timedelta(seconds=1)) and job.due(now + wait)
        waits.append(wait)
        now += wait

    assert waits[:4] == [RETRY_FIRST, 2 * RETRY_FIRST, 4 * RETRY_FIRST, 8 * RETRY_FIRST]
    assert max(waits) == PURGE_EVERY
    job.succeeded(now)
    assert job.failed(now) == RETRY_FIRST  # a success starts the backoff again
