"""A refresh of the version list never installs a list older than one already installed."""

from __future__ import annotations

import asyncio
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import yaml

from pointmesh.clock import ManualClock
from rules_svc.service import RulesService
from rules_svc.versions import VersionInfo, VersionStore
from tests.rules import program_doc

NOW = datetime(2026, 12, 7, 9, tzinfo=UTC)


class HeldListing(VersionStore):
    """The real store; once armed, one listing is read and then held until released, as a
    periodic refresh's read is when its thread is slow to be scheduled."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.armed = False
        self.read = threading.Event()
        self.release = threading.Event()

    def versions(self) -> list[VersionInfo]:
        listed = super().versions()
        if self.armed:
            self.armed = False
            self.read.set()
            self.release.wait(30)
        return listed


async def test_a_refresh_that_listed_before_a_publish_does_not_hide_the_published_version(tmp_path: Path) -> None:
    """The periodic refresh lists versions, a publish commits v2 and installs its own listing,
    then the periodic refresh finishes: it installed its older list over the newer one, and
    until the next refresh the replica that had just answered the publish served v1 again."""
    store = HeldListing(tmp_path / "programs.db")
    service = RulesService(store, ManualClock(NOW))
    document = yaml.safe_dump(program_doc(), sort_keys=False)
    await service.publish("ops", "v1", document, "yaml", NOW + timedelta(minutes=1), "test")
    store.armed = True
    periodic = asyncio.create_task(service.refresh())
    await asyncio.to_thread(store.read.wait, 30)

    published = await service.publish("ops", "v2", document, "yaml", NOW + timedelta(minutes=2), "test")
    store.release.set()
    await periodic

    assert [i.version for i in service.list_versions("test")] == [1, published.version]
    assert service.version_info("test", 0, NOW + timedelta(minutes=3)).version == published.version
    store.close()
