"""Shared plumbing for every pointmesh service: config, RPC bootstrap, events, telemetry, CLI."""
