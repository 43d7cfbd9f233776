"""Shared plumbing for every pointmesh service: config, RPC bootstrap, events, telemetry, CLI."""

from pointmesh.cancellation import install as _install_wait_for

# Before any service, client or loop exists: Python 3.11's asyncio.wait_for can lose a cancel,
# and redis-py calls it for every command (pointmesh/cancellation.py).
_install_wait_for()
