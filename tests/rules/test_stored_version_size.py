"""The stored JSON of a version is bounded, not only its source. YAML aliases and filled-in
defaults made a 0.9 MB document into an 18 MB version: published, but GetProgram could never
send it (over the 16 MB message limit), and followers stopped copying there for good."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2

from pointmesh.errors import status_details
from pointmesh.v1 import rules_pb2
from rules_svc.program import MAX_STORED_JSON_BYTES, ProgramInvalid, load_program
from tests.conftest import start_rules, stop_rules
from tests.rules.test_follower import _follower
from tests.rules.test_rules_grpc import BLACK_FRIDAY, doc, publish
from tests.waiting import until

# 14,000 SKUs of 63 characters (0.9 MB) listed once and aliased by five more rules: 5.5 MB stored.
SKUS = "[" + ", ".join(f"s{i:05d}" + "x" * 57 for i in range(14_000)) + "]"
ALIASED = doc(
    f"  - {{id: r0, when: {{skus: &s {SKUS}}}, effect: {{bonus_points: 1}}}}",
    *(f"  - {{id: r{i}, when: {{skus: *s}}, effect: {{bonus_points: 1}}}}" for i in range(1, 6)),
)


async def test_a_version_whose_stored_json_outgrows_the_bound_is_refused_and_later_ones_reach_followers(
    tmp_path: Path,
) -> None:
    assert len(ALIASED.encode()) < 1_000_000  # the source passes the document bound
    leader = await start_rules(tmp_path / "leader")
    follower = await _follower(tmp_path / "f", leader)
    try:
        now = leader.clock.now()
        await publish(leader, "v1", doc(), now)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await publish(leader, "big", ALIASED, now + timedelta(seconds=1))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        (bad,) = [d for d in status_details(refused.value) if isinstance(d, error_details_pb2.BadRequest)]
        (violation,) = bad.field_violations
        assert violation.field == ""
        assert f"over the {MAX_STORED_JSON_BYTES} bytes a version may hold" in violation.description
        assert "bytes of JSON" in violation.description

        assert (await publish(leader, "v2", doc(BLACK_FRIDAY), now + timedelta(seconds=2))).version == 2

        async def copied() -> bool:
            try:
                found = await follower.stub.ListVersions(rules_pb2.ListVersionsRequest(program="shop"))
            except grpc.aio.AioRpcError as exc:  # nothing of the program copied yet
                if exc.code() != grpc.StatusCode.NOT_FOUND:
                    raise
                return False
            return [v.version for v in found.versions] == [1, 2]

        await until(copied, 30)
    finally:
        await stop_rules(follower)
        await stop_rules(leader)


def test_a_name_longer_than_a_label_is_refused_at_its_path() -> None:
    """A 900 kB rule name aliased by nineteen rules was the reviewer's 18 MB version."""
    with pytest.raises(ProgramInvalid) as refused:
        load_program(doc(f"  - {{id: r0, name: {'x' * 900_000}, effect: {{bonus_points: 1}}}}"))
    assert refused.value.errors == [("rules[0].name", "is 900000 characters long; a name may have at most 200")]
    with pytest.raises(ProgramInvalid) as long_description:
        load_program(doc() + f"description: {'y' * 10_001}\n")
    assert [path for path, _ in long_description.value.errors] == ["description"]
