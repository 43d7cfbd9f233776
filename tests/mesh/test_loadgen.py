"""`pointmesh loadgen`'s code path on a real mesh: thousands of purchases through ledger_svc and
rules_svc, then every member's points equal what the generator computed from the program on
its own, and the ledger reconciles with zero differences. (The million-purchase run is the
same code with bigger numbers; this is the CI-sized one.)"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from loadtests.loadgen import UnmodelledProgram, model, run
from pointmesh.clock import SystemClock
from pointmesh.redis_server import RedisServer, free_port
from tests.conftest import LedgerUnderTest, RulesUnderTest, start_ledger, start_rules, stop_ledger, stop_rules
from tests.mesh.conftest import PROGRAM

LOADGEN = Path(__file__).resolve().parents[2] / "loadtests" / "programs" / "loadgen.yaml"


@pytest.fixture
async def plain_mesh(
    tmp_path: Path, redis_server: RedisServer
) -> AsyncIterator[tuple[LedgerUnderTest, RulesUnderTest]]:
    port = free_port()
    clock = SystemClock()  # receipts are stamped from the wall clock, over the last day
    rules = await start_rules(tmp_path / "rules", clock, rules_addr=f"127.0.0.1:{port}", rules_seed_file=str(LOADGEN))
    ledger = await start_ledger(tmp_path / "ledger", redis_server.url, clock, rules_addr=f"127.0.0.1:{port}",
                                program="loadgen", rules_deadline_seconds=5.0)  # fmt: skip
    yield ledger, rules
    await stop_ledger(ledger)
    await stop_rules(rules)


@pytest.mark.parametrize(("unary", "purchases"), [(False, 3_000), (True, 600)], ids=["ingest-batch", "unary"])
async def test_every_balance_is_what_the_generator_computed(
    plain_mesh: tuple[LedgerUnderTest, RulesUnderTest], unary: bool, purchases: int
) -> None:
    ledger, rules = plain_mesh
    report = await run(ledger.address, rules.address, "loadgen", purchases=purchases, members=400, seed=7,
                       concurrency=3, batch=700, unary=unary)  # fmt: skip
    assert report.mismatches == [] and report.reconcile_differences == 0
    assert (report.purchases, report.refused) == (purchases, 0)


def test_a_program_the_generator_cannot_model_is_refused() -> None:
    import yaml

    with pytest.raises(UnmodelledProgram, match="rules"):
        model(yaml.safe_load(PROGRAM.read_text()))
    assert model(yaml.safe_load(LOADGEN.read_text())).points([150, 99, 1000]) == {"points": 1 + 0 + 10}
