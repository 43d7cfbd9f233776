"""A merge moves every configured unit: merge transaction ids name a unit by its letters, so
units differing only in digits are refused at start-up (tests/plumbing/test_config_bounds.py);
units that pass move each under its own id."""

from __future__ import annotations

from pathlib import Path

import pytest

from pointmesh.config import ConfigError, load_settings
from pointmesh.redis_server import RedisServer
from pointmesh.v1 import ledger_pb2
from tests.conftest import start_ledger, stop_ledger, store_settings
from tests.ledger.helpers import assert_books_balance, balance, create_member, earn, figures, key


def test_units_a_merge_could_not_tell_apart_stop_the_start_naming_both() -> None:
    with pytest.raises(ConfigError, match="'points' and 'points2' differ only"):
        load_settings({"POINTMESH_UNITS": "points,points2"})


@pytest.mark.parametrize("store", ["sqlite"])
async def test_a_merge_moves_each_of_three_units_under_its_own_id(
    request: pytest.FixtureRequest, tmp_path: Path, redis_server: RedisServer, store: str
) -> None:
    units = ("points", "tier_credits", "stars.2026")
    ledger = await start_ledger(tmp_path / "data", redis_server.url, units=units, **store_settings(request, store))
    try:
        s = ledger.stub
        a, b = (await create_member(s)).member_id, (await create_member(s)).member_id
        for points, unit in zip((100, 7, 3), units, strict=True):
            await earn(s, a, points, unit=unit)

        merged = await s.MergeMembers(ledger_pb2.MergeMembersRequest(
            idempotency_key=key("merge-units"), source_member_id=a, target_member_id=b))  # fmt: skip

        assert dict(merged.moved_points) == {"points": 100, "tier_credits": 7, "stars.2026": 3}
        assert [figures(await balance(s, b, u))["balance"] for u in units] == [100, 7, 3]
        assert [figures(await balance(s, a, u))["balance"] for u in units] == [0, 0, 0]
        await assert_books_balance(ledger)
    finally:
        await stop_ledger(ledger)
