"""The Redis script sums track values exactly when they are negative too, as MemoryVelocity's
integers do. fraud_svc refuses negative amounts and points today, but a return or an adjustment
recorded as a negative value must not be summed wrong once one is: the script's exact path split
"-12345678901" into "-1234" and "5678901" (adding the low digits instead of taking them off),
failed on "-1234567" (its high part "-" is no number), and a window summing to -2**53 or below,
or passing 2**53 on the way to a small total, came back rounded."""

from __future__ import annotations

import uuid

import pytest
from redis.asyncio import Redis

from fraud_svc.velocity import MemoryVelocity, Track, TrackSpec, Velocity
from fraud_svc.velocity_redis import RedisVelocity
from pointmesh.bounds import MAX_AMOUNT_MINOR
from pointmesh.redis_server import RedisServer

BIG = MAX_AMOUNT_MINOR
CASES = {
    # Past 2**53, with one large negative value (its low seven digits must come off).
    "large-negative-in-a-large-sum": [BIG - i for i in range(1, 12)] + [-(BIG - 12_345_679)],
    # Past 2**53, with a negative value of eight characters (a high part of "-" alone).
    "short-negative-in-a-large-sum": [BIG - i for i in range(1, 11)] + [-1_234_567],
    # Below -2**53: doubles no longer hold every integer there either.
    "sum-below-minus-2-to-the-53": [-(BIG - i) for i in range(1, 11)],
    # Past 2**53 on the way, back to a small total (newest first: the positives come last).
    "large-on-the-way-small-at-the-end": [-(BIG - 2 * i) for i in range(1, 11)] + [BIG - 1] * 9 + [BIG - 106],
    # Small negative values: exact as doubles, the common case a return would bring.
    "small-signed": [2_500, -2_500, 1_999, -7, 0, -1_000_000],
}


@pytest.mark.parametrize("fetch_rows", [3, 32])
@pytest.mark.parametrize("amounts", list(CASES.values()), ids=list(CASES))
async def test_signed_sums_in_redis_are_exact_and_equal_memorys(
    redis_server: RedisServer, fetch_rows: int, amounts: list[int]
) -> None:
    spec = TrackSpec((3_600_000,), (60_000, 3_600_000), want_prev=True, retention_ms=3_600_000)
    client = Redis.from_url(redis_server.url)
    try:
        stores: list[Velocity] = [MemoryVelocity(), RedisVelocity(client, prefix=f"test:{uuid.uuid4().hex}:",
                                                                   fetch_rows=fetch_rows)]  # fmt: skip
        answers = []
        for velocity in stores:
            for i, amount in enumerate(amounts):
                at = 1_760_000_000_000 + i * 1_000
                last = await velocity.observe(f"e{i}", at, [Track(spec, "m", amount, "", True)], [])
            answers.append(last)
    finally:
        await client.aclose()

    in_last_minute = sum(amounts[-60:])
    assert answers[1][:3] == (len(amounts), in_last_minute, sum(amounts))
    assert answers[0] == answers[1]
