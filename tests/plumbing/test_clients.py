"""The ledger client retries exactly the unary methods, all of which carry idempotency or are reads."""

from __future__ import annotations

import json

from pointmesh.clients import LEDGER_SERVICE, unary_methods
from pointmesh.rpc import service_config


def test_ledger_client_retries_unary_methods_but_never_streams() -> None:
    methods = unary_methods(LEDGER_SERVICE)
    assert "/pointmesh.v1.LedgerService/Earn" in methods
    assert "/pointmesh.v1.LedgerService/GetBalance" in methods
    assert "/pointmesh.v1.LedgerService/WatchEvents" not in methods
    assert "/pointmesh.v1.LedgerService/IngestBatch" not in methods
    config = json.loads(service_config(methods, 4))
    names = {(n["service"], n["method"]) for n in config["methodConfig"][0]["name"]}
    assert ("pointmesh.v1.LedgerService", "Transfer") in names
    assert ("pointmesh.v1.LedgerService", "WatchEvents") not in names
