"""Typed settings read once from POINTMESH_* environment variables.

Defaults run everything on one laptop; docs/configuration.md lists every variable.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from pointmesh.event_loop import LOOPS as EVENT_LOOPS
from pointmesh.logs import FORMATS as LOG_FORMATS

PREFIX = "POINTMESH_"
# Smallest generated data a model is trained on: below it the holdout has too few cases to
# evaluate or set thresholds with (`pointmesh fraud|churn train --rows`, DEFAULT_MODEL_ROWS).
MIN_FRAUD_TRAIN_ROWS = 4_000
MIN_CHURN_TRAIN_MEMBERS = 2_000
# Anyone can read it here, so anyone can sign a webhook with it: set POINTMESH_WEBHOOK_SECRET.
DEV_WEBHOOK_SECRET = "pointmesh-dev-webhook-secret"


class ConfigError(ValueError):
    """A POINTMESH_* variable could not be parsed; the message names it."""


@dataclass(frozen=True, slots=True)
class Settings:
    # Where embedded state lives (SQLite shards, the private Redis's data, models).
    data_dir: Path = Path(".pointmesh")
    redis_url: str = "redis://127.0.0.1:6390/0"
    # Port of the private redis-server that `pointmesh up` starts.
    redis_port: int = 6390
    ledger_addr: str = "127.0.0.1:50051"
    ledger_metrics_port: int = 9464
    # Ledger store: "sqlite" (embedded, the default) or "cassandra" (the cassandra_* settings).
    store: str = "sqlite"
    rules_addr: str = "127.0.0.1:50052"
    fraud_addr: str = "127.0.0.1:50053"
    fraud_metrics_port: int = 9466
    # Where model artifacts live; empty: DATA_DIR/models. fraud_svc trains a small default
    # model from generated data at start-up when it finds none.
    models_dir: str = ""
    # Rows of generated data for that default model.
    default_model_rows: int = 40_000
    # The fraud team's decision settings over the model's proposed thresholds (YAML or JSON:
    # thresholds per kind, velocity rules, blocked devices; docs/fraud.md) and the retention
    # offer catalogue (a list of offers); empty: the model's thresholds, the built-in catalogue.
    fraud_decision_file: str = ""
    fraud_offer_catalogue_file: str = ""
    # host:port of the REST/websocket gateway.
    gateway_addr: str = "127.0.0.1:8080"
    # Signs member tokens (JWT HS256), 32 characters or more; set it in production, the same on
    # every gateway. Unset: a secret generated once in DATA_DIR/gateway (one machine only).
    member_token_secret: str = ""
    member_token_ttl_seconds: int = 3600
    # Where the gateway keeps API keys (hashed): "sqlite" under DATA_DIR/gateway (one machine), or
    # "redis" at REDIS_URL, shared by every gateway replica (Kubernetes).
    gateway_key_store: str = "sqlite"
    # Events a websocket may have queued before the gateway drops the slow connection.
    live_queue_max: int = 256
    # Deadline of each gateway -> service call.
    gateway_deadline_seconds: float = 5.0
    # Secret vendors sign their webhooks with (HMAC-SHA256). The default is published, for a
    # laptop and tests only: the gateway logs a warning at start while it is in use.
    webhook_secret: str = DEV_WEBHOOK_SECRET
    rules_metrics_port: int = 9465
    # The program purchases earn under (its id in the rule set document).
    program: str = "aurora"
    # Published at rules_svc start-up when the store has no version of it yet; empty: none.
    rules_seed_file: str = "builtin:aurora"
    # How often rules_svc re-reads the version list (a follower: copies the leader's).
    rules_reload_seconds: float = 2.0
    # host:port of the rules_svc instance holding published versions and gamification state;
    # set it on evaluation replicas, which copy its versions and forward publishing and the
    # gamification calls to it (rules_svc/follower.py). Empty: this instance is the leader.
    rules_leader_addr: str = ""
    # The ledger screens purchases and redemptions with fraud_svc (at fraud_addr) within this
    # deadline; when it cannot, these verdicts (allow, review, deny) stand in, per operation.
    fraud_screening: bool = True
    fraud_deadline_seconds: float = 0.25
    fraud_unavailable_purchase: str = "allow"
    fraud_unavailable_redemption: str = "allow"
    fraud_unavailable_large_redemption: str = "review"
    fraud_large_redemption_points: int = 5000
    # Deadline of the ledger's Evaluate call; past it the purchase is kept as pending accrual.
    rules_deadline_seconds: float = 0.5
    # Deadline of the EvaluateBatch and ScoreBatch calls batch ingest makes (hundreds of
    # purchases each); past it the chunk's purchases take the unary path one by one.
    batch_deadline_seconds: float = 30.0
    ledger_shards: int = 4
    # NORMAL in WAL mode survives a process crash; see docs/decisions/0003-sqlite-durability.md.
    sqlite_synchronous: str = "NORMAL"
    # Under load a shard commits at most once per window, so one commit carries many postings.
    sqlite_group_window_ms: float = 2.0
    # Units an account may hold; the first one is the default.
    units: tuple[str, ...] = ("points", "tier_credits")
    # Program policy for lots earned without an explicit expiry; 0 means never.
    expiry_days: int = 365
    hold_timeout_seconds: int = 900
    hold_max_timeout_seconds: int = 7 * 24 * 3600
    # How far a reversal may take a balance below zero; beyond it the rest becomes debt.
    negative_limit_points: int = 0
    # Idempotency keys are kept at least this long (the longest retry/replay window).
    idempotency_retention_days: int = 35
    # Cassandra: settled history older than this leaves members' live partitions for monthly
    # history partitions (daily, with key retention); SQLite ignores it.
    live_history_days: int = 400
    # Secret for payment-card tokens; set it in production.
    card_hmac_secret: str = "pointmesh-dev-card-secret"
    maintenance_interval_seconds: float = 5.0
    # ledger_svc proves its books (pointmesh ledger reconcile) this often and voids holds its
    # timers missed; 0 turns the background pass off.
    reconcile_interval_seconds: float = 3600.0
    outbox_poll_seconds: float = 0.05
    event_stream_maxlen: int = 1_000_000
    # The Cassandra ledger store (docs/cassandra.md); `pointmesh dev cassandra` listens here.
    # host:port,... (all nodes share the port).
    cassandra_contact_points: str = "127.0.0.1:9042"
    cassandra_keyspace: str = "pointmesh"
    # Names this ledger's rows inside the keyspace (several ledgers may share one keyspace).
    cassandra_ledger: str = "main"
    # Local datacenter for DC-aware routing; empty means the first contact point's.
    cassandra_local_dc: str = ""
    cassandra_username: str = ""
    cassandra_password: str = ""
    # A CA bundle turns TLS on (the server certificate is verified against it).
    cassandra_tls_ca_file: str = ""
    # What `pointmesh ledger migrate` creates the keyspace with: simple:N or dc1:3,dc2:3.
    cassandra_replication: str = "simple:1"
    cassandra_consistency: str = "LOCAL_QUORUM"
    cassandra_serial_consistency: str = "LOCAL_SERIAL"
    cassandra_request_timeout_seconds: float = 12.0
    # "redis" (Redis Streams at redis_url, the embedded default) or "kafka" (kafka_bootstrap).
    event_bus: str = "redis"
    kafka_bootstrap: str = "127.0.0.1:9092"
    # Partitions and replication of topics `pointmesh events topics create` makes.
    event_partitions: int = 6
    event_replication: int = 1
    # rules_svc drives gamification from the ledger's events (group rules-gamification) and
    # posts rewards to ledger_addr.
    gamification_consumer: bool = True
    # ledger_svc consumes bulk purchases from the ingest topic (group ledger-ingest).
    ingest_consumer: bool = True
    cache_ttl_seconds: int = 300
    redis_timeout_seconds: float = 0.5
    grace_seconds: float = 10.0
    log_level: str = "INFO"
    log_format: str = "json"
    # The loop service processes run on (pointmesh/event_loop.py): uvloop, or asyncio's own.
    event_loop: str = "uvloop"
    fault_point: str = ""


def _parse(name: str, raw: str, default: Any) -> Any:
    try:
        if isinstance(default, bool):
            if raw.lower() not in {"1", "0", "true", "false", "yes", "no", "on", "off"}:
                raise ValueError("expected a boolean")
            return raw.lower() in {"1", "true", "yes", "on"}
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
        if isinstance(default, Path):
            return Path(raw)
        if isinstance(default, tuple):
            return tuple(part.strip() for part in raw.split(",") if part.strip())
    except ValueError as exc:
        raise ConfigError(f"{PREFIX}{name.upper()}={raw!r}: {exc}") from exc
    return raw


def load_settings(env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
    """Builds Settings from the environment; keyword overrides win (tests use them)."""
    source = os.environ if env is None else env
    values: dict[str, Any] = {}
    for f in fields(Settings):
        key = PREFIX + f.name.upper()
        if key in source:
            default = Settings.__dataclass_fields__[f.name].default
            values[f.name] = _parse(f.name, source[key], default)
    values.update(overrides)
    settings = Settings(**values)
    _validate(settings)
    return settings


def settings_or_exit() -> Settings:
    """Settings for a command-line entry point: a bad value ends the process with its message
    (naming the variable), not a traceback."""
    try:
        return load_settings()
    except ConfigError as exc:
        raise SystemExit(f"configuration error: {exc}") from exc


# Deadlines, lifetimes and intervals: a finite number of seconds above zero (NaN compares
# false with everything, so a bare `<= 0` check lets it through).
_POSITIVE_SECONDS = (
    "member_token_ttl_seconds", "gateway_deadline_seconds", "rules_reload_seconds", "fraud_deadline_seconds",
    "rules_deadline_seconds", "batch_deadline_seconds", "hold_timeout_seconds", "hold_max_timeout_seconds",
    "maintenance_interval_seconds", "outbox_poll_seconds", "cassandra_request_timeout_seconds",
    "cache_ttl_seconds", "redis_timeout_seconds",
)  # fmt: skip
# Zero has a meaning here (off / no drain), so zero or more.
_NON_NEGATIVE_SECONDS = ("reconcile_interval_seconds", "grace_seconds")
# 0 turns the metrics port off.
_PORTS_OR_OFF = ("ledger_metrics_port", "rules_metrics_port", "fraud_metrics_port")
# Listen and call addresses; port 0 on a listen address is "any free port".
_ADDRESSES = ("ledger_addr", "rules_addr", "fraud_addr", "gateway_addr")
_AT_LEAST_ONE = ("live_queue_max", "event_stream_maxlen", "event_partitions", "event_replication")
_DAYS = ("expiry_days", "live_history_days")


def _var(name: str) -> str:
    return f"{PREFIX}{name.upper()}"


def _host_port(name: str, value: str, *, port_zero: bool) -> None:
    """`host:port` (IPv6 hosts in brackets); raises ConfigError naming the variable otherwise."""
    host, colon, port = value.strip().rpartition(":")
    lowest = 0 if port_zero else 1
    if not colon or not host or not port.isdigit() or not lowest <= int(port) <= 65535:
        raise ConfigError(f"{_var(name)}={value!r}: expected host:port with a port in {lowest}..65535")


_UNIT_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")


def unit_tag(unit: str) -> str:
    """The suffix that names a unit in merge transaction ids, where ids allow only lowercase
    letters: units whose tags are equal cannot both be configured (`_check_units`)."""
    return "".join(ch for ch in unit.lower() if ch.isalpha())


def _check_units(units: tuple[str, ...]) -> None:
    """Units name accounts (`member:<id>:<unit>`) and merge transactions (by `unit_tag`): a unit
    with other characters would read as another account, and two units with one tag (`points`
    and `points2`, `Points`) would give a merge's two moves one id, failing the merge half-way."""
    tags: dict[str, str] = {}
    for unit in units:
        if not 1 <= len(unit) <= 64 or not set(unit) <= _UNIT_CHARS or not unit_tag(unit):
            raise ConfigError(
                f"{PREFIX}UNITS: {unit!r} is not a unit name (1-64 of letters, digits, '_', '.', '-', with a letter)"
            )
        other = tags.get(unit_tag(unit))
        if other is not None:
            raise ConfigError(
                f"{PREFIX}UNITS lists {unit!r} twice" if other == unit else
                f"{PREFIX}UNITS: {other!r} and {unit!r} differ only in case, digits or punctuation;"
                " a merge names each unit by its letters alone"
            )  # fmt: skip
        tags[unit_tag(unit)] = unit


def _validate(s: Settings) -> None:
    if s.ledger_shards < 1:
        raise ConfigError(f"{PREFIX}LEDGER_SHARDS must be >= 1, got {s.ledger_shards}")
    if not s.units:
        raise ConfigError(f"{PREFIX}UNITS must name at least one unit")
    _check_units(s.units)
    if not 1 <= s.idempotency_retention_days <= 1000:
        # Cassandra writes the retention as a TTL and refuses expiry dates past 2038-01-19 in
        # its default storage compatibility mode; 1,000 days stays clear of that until 2035.
        raise ConfigError(f"{PREFIX}IDEMPOTENCY_RETENTION_DAYS must be 1-1000, got {s.idempotency_retention_days}")
    if s.negative_limit_points < 0:
        raise ConfigError(f"{PREFIX}NEGATIVE_LIMIT_POINTS must be >= 0")
    if s.sqlite_synchronous.upper() not in {"NORMAL", "FULL", "EXTRA"}:
        raise ConfigError(f"{PREFIX}SQLITE_SYNCHRONOUS must be NORMAL, FULL or EXTRA")
    for name in ("purchase", "redemption", "large_redemption"):
        if getattr(s, f"fraud_unavailable_{name}") not in {"allow", "review", "deny"}:
            raise ConfigError(f"{PREFIX}FRAUD_UNAVAILABLE_{name.upper()} must be allow, review or deny")
    if s.store not in {"sqlite", "cassandra"}:
        raise ConfigError(f"{PREFIX}STORE must be sqlite or cassandra, got {s.store!r}")
    if s.cassandra_consistency not in {"LOCAL_QUORUM", "QUORUM", "EACH_QUORUM", "ALL", "LOCAL_ONE", "ONE"}:
        raise ConfigError(f"{PREFIX}CASSANDRA_CONSISTENCY must name a Cassandra consistency level")
    if s.cassandra_serial_consistency not in {"LOCAL_SERIAL", "SERIAL"}:
        raise ConfigError(f"{PREFIX}CASSANDRA_SERIAL_CONSISTENCY must be LOCAL_SERIAL or SERIAL")
    if s.gateway_key_store not in {"sqlite", "redis"}:
        raise ConfigError(f"{PREFIX}GATEWAY_KEY_STORE must be sqlite or redis, got {s.gateway_key_store!r}")
    if s.event_bus not in {"redis", "kafka"}:
        raise ConfigError(f"{PREFIX}EVENT_BUS must be redis or kafka, got {s.event_bus!r}")
    if not 0 <= s.sqlite_group_window_ms <= 50:
        raise ConfigError(f"{PREFIX}SQLITE_GROUP_WINDOW_MS must be between 0 and 50")
    _validate_bounds(s)


def _validate_bounds(s: Settings) -> None:
    for name in _POSITIVE_SECONDS:
        value = getattr(s, name)
        if not (math.isfinite(value) and value > 0):
            raise ConfigError(f"{_var(name)} must be a finite number of seconds above 0, got {value!r}")
    for name in _NON_NEGATIVE_SECONDS:
        value = getattr(s, name)
        if not (math.isfinite(value) and value >= 0):
            raise ConfigError(f"{_var(name)} must be a finite number of seconds, 0 or more, got {value!r}")
    if s.hold_timeout_seconds > s.hold_max_timeout_seconds:
        raise ConfigError(
            f"{_var('hold_timeout_seconds')} ({s.hold_timeout_seconds}) must not exceed "
            f"{_var('hold_max_timeout_seconds')} ({s.hold_max_timeout_seconds})"
        )
    if not 1 <= s.redis_port <= 65535:
        raise ConfigError(f"{_var('redis_port')} must be a port in 1..65535, got {s.redis_port}")
    for name in _PORTS_OR_OFF:
        if not 0 <= getattr(s, name) <= 65535:
            raise ConfigError(f"{_var(name)} must be a port in 0..65535 (0: off), got {getattr(s, name)}")
    for name in _ADDRESSES:
        _host_port(name, getattr(s, name), port_zero=True)
    if s.rules_leader_addr:
        _host_port("rules_leader_addr", s.rules_leader_addr, port_zero=False)
    for name in ("kafka_bootstrap", "cassandra_contact_points"):
        for part in getattr(s, name).split(","):
            _host_port(name, part, port_zero=False)
    if len({p.strip().rpartition(":")[2] for p in s.cassandra_contact_points.split(",")}) != 1:
        raise ConfigError(
            f"{_var('cassandra_contact_points')}={s.cassandra_contact_points!r}: nodes must share one port"
        )
    for name in _AT_LEAST_ONE:
        if getattr(s, name) < 1:
            raise ConfigError(f"{_var(name)} must be at least 1, got {getattr(s, name)}")
    for name in _DAYS:
        if getattr(s, name) < 0:
            raise ConfigError(f"{_var(name)} must be 0 or more days, got {getattr(s, name)}")
    if s.fraud_large_redemption_points < 0:
        raise ConfigError(f"{_var('fraud_large_redemption_points')} must be 0 or more")
    if s.default_model_rows < MIN_FRAUD_TRAIN_ROWS:
        raise ConfigError(f"{_var('default_model_rows')} must be at least {MIN_FRAUD_TRAIN_ROWS}")
    if s.log_level.upper() not in logging.getLevelNamesMapping():
        levels = ", ".join(sorted(logging.getLevelNamesMapping()))
        raise ConfigError(f"{_var('log_level')}={s.log_level!r}: expected one of {levels}")
    if s.log_format not in LOG_FORMATS:
        raise ConfigError(f"{_var('log_format')}={s.log_format!r}: expected one of {', '.join(LOG_FORMATS)}")
    if s.event_loop not in EVENT_LOOPS:
        raise ConfigError(f"{_var('event_loop')}={s.event_loop!r}: expected one of {', '.join(EVENT_LOOPS)}")
    if s.event_loop == "uvloop" and importlib.util.find_spec("uvloop") is None:
        raise ConfigError(f"{_var('event_loop')}=uvloop, but uvloop is not installed here: set it to asyncio")
