"""benchmarks/profile_mesh.py's summary of py-spy stacks: what the kept profiles are read with."""

from __future__ import annotations

from benchmarks.profile_mesh import summarise

RAW = """\
main (pointmesh/cli.py:10);serve (/x/site-packages/grpc/aio/_server.py:5);accrue (/work/main/ledger_svc/purchases.py:20) 6
main (pointmesh/cli.py:10);accrue (/w/ledger_svc/purchases.py:20);accrue (/w/ledger_svc/purchases.py:30);dumps (/w/ledger_svc/codec.py:3) 3
main (pointmesh/cli.py:10);idle 1
not a stack line
"""


def test_shares_are_inclusive_once_per_stack_and_own_at_the_leaf() -> None:
    summary = summarise(RAW)
    assert summary.startswith("10 samples")
    inclusive, own = summary.split("own (the function's own code):")
    assert "100.0%  main (pointmesh/cli.py)" in inclusive
    # A recursive frame counts once per stack: 6 + 3 samples, not 6 + 3 + 3.
    assert " 90.0%  accrue (ledger_svc/purchases.py)" in inclusive
    assert " 60.0%  serve (grpc/aio/_server.py)" in inclusive
    assert " 60.0%  accrue (ledger_svc/purchases.py)" in own
    assert " 30.0%  dumps (ledger_svc/codec.py)" in own
    assert " 10.0%  idle" in own


def test_no_samples_says_so() -> None:
    assert summarise("") == "no samples\n"
