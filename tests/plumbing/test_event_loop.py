"""Service processes run on the loop POINTMESH_EVENT_LOOP names (uvloop unless told otherwise),
and what the standard loop was tested for holds on uvloop too: a cancel is never lost, and a
bus tail cancelled as an event reaches it stops."""

from __future__ import annotations

import asyncio
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import uvloop

from pointmesh import event_loop
from pointmesh.config import ConfigError, load_settings
from pointmesh.redis_server import RedisServer
from tests.loops import run_on, suite_loop
from tests.plumbing import test_cancellation

REPO = Path(__file__).resolve().parents[2]


async def _loop_type() -> type:
    return type(asyncio.get_running_loop())


def test_the_default_setting_runs_uvloop_and_asyncio_is_one_setting_away() -> None:
    assert run_on(load_settings({}).event_loop, _loop_type()) is uvloop.Loop
    standard = run_on(load_settings({"POINTMESH_EVENT_LOOP": "asyncio"}).event_loop, _loop_type())
    assert issubclass(standard, asyncio.BaseEventLoop) and not issubclass(standard, uvloop.Loop)


def test_an_unknown_loop_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="'trio'"):
        event_loop.run(_loop_type(), "trio")


@pytest.mark.parametrize("kind", event_loop.LOOPS)
def test_a_cancel_racing_finished_work_is_kept_on_either_loop(kind: str) -> None:
    run_on(kind, test_cancellation.test_a_cancel_in_the_instant_the_awaited_work_finishes_is_kept())
    run_on(kind, test_cancellation.test_wait_for_times_out_cancelling_what_it_waited_for())


@pytest.mark.parametrize("kind", event_loop.LOOPS)
def test_bus_tails_cancelled_as_an_event_reaches_them_stop_on_either_loop(kind: str, redis_server: RedisServer) -> None:
    """test_cancellation runs it on the suite's loop; this runs it on both, whichever that is."""
    run_on(kind, test_cancellation.test_a_bus_tail_cancelled_as_an_event_reaches_it_stops(redis_server))


def test_a_service_process_serves_on_the_loop_its_setting_names(tmp_path: Path) -> None:
    """The serve command's own loop, seen from inside the process: the bootstrap is the one
    place that picks it, so a service started any other way would show here."""
    probe = (
        "import asyncio, sys\n"
        "from pointmesh import cli\n"
        "async def serve(settings):\n"
        "    print(type(asyncio.get_running_loop()).__module__, flush=True)\n"
        "import types; sys.modules['ledger_svc.app'] = types.SimpleNamespace(serve=serve)\n"
        "sys.exit(cli.main(['ledger', 'serve']))\n"
    )
    seen = {}
    for kind in event_loop.LOOPS:
        env = {"PATH": "/usr/bin:/bin", "POINTMESH_EVENT_LOOP": kind, "POINTMESH_DATA_DIR": str(tmp_path),
               "POINTMESH_LEDGER_METRICS_PORT": "0", "POINTMESH_LOG_LEVEL": "WARNING"}  # fmt: skip
        done = subprocess.run([sys.executable, "-c", probe], env=env, cwd=REPO, capture_output=True, text=True,
                              timeout=120)  # fmt: skip
        assert done.returncode == 0, done.stderr
        seen[kind] = done.stdout.split()[-1]
    assert seen == {"uvloop": "uvloop", "asyncio": "asyncio.unix_events"}


async def test_in_process_services_in_tests_run_on_the_loop_service_processes_run_on() -> None:
    kind = suite_loop()
    assert (type(asyncio.get_running_loop()) is uvloop.Loop) == (kind == "uvloop")


def test_a_machine_without_uvloop_is_told_to_choose_asyncio(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "uvloop" else real(name, *a))
    with pytest.raises(ConfigError, match="POINTMESH_EVENT_LOOP=uvloop, but uvloop is not installed"):
        load_settings({})
    assert load_settings({"POINTMESH_EVENT_LOOP": "asyncio"}).event_loop == "asyncio"
