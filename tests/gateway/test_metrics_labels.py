"""The gateway's request metrics are labelled by what the server chose (route, a standard
method, status), never by a token the client made up: anyone on the internet can send
requests, and each new label value is a series the registry keeps for ever."""

from __future__ import annotations

import httpx

from gateway.instrument import HTTP_REQUESTS
from tests.gateway.conftest import GatewayUnderTest


def _series() -> set[tuple[str, ...]]:
    return {tuple(s.labels.values()) for m in HTTP_REQUESTS.collect() for s in m.samples if s.name.endswith("_total")}


async def test_made_up_methods_from_anyone_share_one_label(gw: GatewayUnderTest) -> None:
    before = _series()
    async with httpx.AsyncClient(base_url=gw.url) as anyone:  # no credential at all
        for i in range(50):
            assert (await anyone.request(f"M{i:06d}", "/healthz")).status_code == 405
        assert (await anyone.get("/healthz")).status_code == 200
        text = (await anyone.get("/metrics")).text
    grown = _series() - before
    assert 'method="M000049"' not in text
    assert {labels[1] for labels in grown} <= {"GET", "OTHER"}, grown
    assert any(labels[1] == "OTHER" for labels in _series()), "the made-up methods were not counted at all"
