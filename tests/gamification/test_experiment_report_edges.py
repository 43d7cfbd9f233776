"""Edges of the experiment report: intervals of a rate stay within [0, 1], and a report of a
program not yet in effect blames the request's own field."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import grpc
import pytest
import yaml
from google.rpc import error_details_pb2

from pointmesh.errors import status_details
from pointmesh.timestamps import to_timestamp
from pointmesh.v1 import common_pb2, rules_pb2
from rules_svc.experiment_stats import report
from rules_svc.game_store import GameStore
from tests.gamification.conftest import Game, write_program


def test_the_repeat_rate_interval_of_an_arm_where_everyone_or_no_one_came_back_stays_within_0_and_1(
    tmp_path: Path,
) -> None:
    store = GameStore(tmp_path / "game.sqlite")
    for i in range(16):  # every member of `double` came back; no one of `base` (21 members) did
        store.record_exposure("meshmart", "exp", f"d-{i}", "double", 2, 20)
    for i in range(21):
        store.record_exposure("meshmart", "exp", f"b-{i}", "base", 1, 10)
    base, double = report(store.experiment_members("meshmart", "exp", ""), "base")
    store.close()
    assert double.repeat_rate == 1.0 and base.repeat_rate == 0.0
    assert 0.0 <= double.repeat_ci[0] <= double.repeat_ci[1] <= 1.0, double.repeat_ci
    assert 0.0 <= base.repeat_ci[0] <= base.repeat_ci[1] <= 1.0, base.repeat_ci
    assert double.repeat_ci[1] == 1.0 and base.repeat_ci[0] == 0.0  # the observed rate is an end


async def test_a_report_asked_before_the_programs_first_version_starts_names_no_basket_field(
    game: Game, tmp_path: Path
) -> None:
    """A program scheduled to start next week: asking for its experiment's report now is refused,
    naming a field of GetExperimentReportRequest, not `basket.receipt_time` (no basket was sent)."""
    document = yaml.safe_load(write_program(tmp_path).read_text())
    document["program"] = "futuremart"
    await game.rules.stub.PublishProgram(rules_pb2.PublishProgramRequest(
        idempotency_key=common_pb2.IdempotencyKey(key="future-1"), document=yaml.safe_dump(document),
        effective_from=to_timestamp(game.clock.now() + timedelta(days=7)), published_by="ops",
    ))  # fmt: skip
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await game.rules.stub.GetExperimentReport(
            rules_pb2.GetExperimentReportRequest(program="futuremart", experiment_id="double-vs-base")
        )
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION, refused.value.details()
    fields = [v.field for d in status_details(refused.value) if isinstance(d, error_details_pb2.BadRequest)
              for v in d.field_violations]  # fmt: skip
    assert fields == ["program"], (fields, refused.value.details())
