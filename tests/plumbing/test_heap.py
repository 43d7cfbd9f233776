"""A service process freezes its startup heap once serving; a test process never does."""

from __future__ import annotations

import subprocess
import sys

_PROBE = """
import gc, weakref
from pointmesh import heap

class Node:
    pass

def cycle():
    a, b = Node(), Node()
    a.other, b.other = b, a
    return weakref.ref(a)

gc.disable()  # only settle() may collect in this probe
keep = [Node() for _ in range(1000)]
heap.settle()
print(gc.get_freeze_count())
if {tune}:
    heap.tune_service_process()
dead = cycle()
heap.settle()
print(gc.get_freeze_count(), dead() is None)
"""


def _probe(tune: bool) -> list[str]:
    out = subprocess.run([sys.executable, "-c", _PROBE.format(tune=tune)], capture_output=True, text=True, check=True)
    return out.stdout.split()


def test_settle_does_nothing_outside_a_service_process() -> None:
    assert _probe(tune=False) == ["0", "0", "False"]


def test_a_service_process_collects_startup_garbage_then_freezes_the_rest() -> None:
    before, frozen, collected = _probe(tune=True)
    assert before == "0"
    assert int(frozen) > 1000  # the objects kept alive, and the interpreter's own
    assert collected == "True"  # the unreachable cycle was collected, not frozen
