"""`pointmesh dev kafka|cassandra ...` (local copies of the production servers) and
`pointmesh events|ingest ...` (topics, consumer groups and bulk purchases, docs/events.md)."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from google.protobuf import json_format

from pointmesh.cassandra_server import CassandraServer
from pointmesh.config import Settings, settings_or_exit
from pointmesh.events import (
    INGEST_PURCHASES,
    MAX_EVENT_BYTES,
    TOPICS,
    EventBus,
    OutgoingEvent,
    dead_letter_topic,
    event_bytes,
    open_bus,
)
from pointmesh.kafka_server import KafkaServer
from pointmesh.redrive import Redriven, redrive
from pointmesh.v1 import ledger_pb2

T = TypeVar("T")


def _loopback_port(setting: str, value: str) -> int:
    host, _, port = value.split(",")[0].rpartition(":")
    if host not in {"127.0.0.1", "localhost"}:
        raise SystemExit(f"dev servers run on loopback only; POINTMESH_{setting} is {host}:{port}")
    return int(port)


def _dev_server(action: str, name: str, server: KafkaServer | CassandraServer, endpoint: str) -> int:
    if action == "start":
        seconds = server.start()
        print(f"{name}: ready on {endpoint} in {seconds:.1f}s (data {server.data_dir}, log {server.process.log_path})")
    elif action == "stop":
        server.stop()
        print(f"{name}: stopped")
    else:
        pid = server.process.running_pid()
        print(f"{name}: running, pid {pid}, {endpoint}" if pid else f"{name}: not running")
        return 0 if pid else 3
    return 0


def cmd_dev_kafka(args: argparse.Namespace) -> int:
    """The dev broker listens where POINTMESH_KAFKA_BOOTSTRAP points; its controller one port up."""
    settings = settings_or_exit()
    port = _loopback_port("KAFKA_BOOTSTRAP", settings.kafka_bootstrap)
    server = KafkaServer(settings.data_dir / "kafka", port, port + 1)
    return _dev_server(args.action, "kafka", server, server.bootstrap)


def cmd_dev_cassandra(args: argparse.Namespace) -> int:
    """CQL where POINTMESH_CASSANDRA_CONTACT_POINTS points; storage and JMX one and two ports up."""
    settings = settings_or_exit()
    cql = _loopback_port("CASSANDRA_CONTACT_POINTS", settings.cassandra_contact_points)
    server = CassandraServer(settings.data_dir / "cassandra", cql, cql + 1, cql + 2)
    return _dev_server(args.action, "cassandra", server, server.contact_point)


def cmd_topics_create(_: argparse.Namespace) -> int:
    settings = settings_or_exit()
    topics = [*TOPICS, *(dead_letter_topic(t) for t in TOPICS)]

    # Redis makes a stream on first write, so ensure_topics there asks nothing of it: the ping
    # before it (_on_bus) keeps a bus nobody can reach from being reported ready.
    if _on_bus(settings, "events topics create", lambda bus: bus.ensure_topics(topics)) is None:
        return 1
    print(f"{settings.event_bus}: topics ready: {', '.join(topics)}")
    return 0


def _unreachable(settings: Settings, why: str) -> str:
    where = settings.redis_url if settings.event_bus == "redis" else settings.kafka_bootstrap
    return f"{settings.event_bus}: cannot reach the event bus at {where}: {why}"


def _on_bus(settings: Settings, command: str, work: Callable[[EventBus], Awaitable[T]]) -> tuple[T] | None:
    """(what `work` on the configured bus returned,) or None once the reason it failed was told
    the operator (a bus nobody can reach, a topic Kafka lacks, a group still consuming), never
    as a traceback."""

    async def run() -> tuple[T] | str:
        bus = open_bus(settings)
        try:
            try:
                await bus.ping()
            except Exception as exc:  # any failure to reach the bus is reported, not traced
                return _unreachable(settings, str(exc) or type(exc).__name__)
            try:
                return (await work(bus),)
            except Exception as exc:  # the bus's refusal, reported
                return f"{command}: {settings.event_bus}: {exc or type(exc).__name__}"
        finally:
            await bus.close()

    done = asyncio.run(run())
    if isinstance(done, str):
        print(done, file=sys.stderr)
        return None
    return done


def cmd_replay(args: argparse.Namespace) -> int:
    if not args.group.strip():
        print("--group: must name a consumer group", file=sys.stderr)
        return 2
    settings = settings_or_exit()
    if _on_bus(settings, "events replay", lambda bus: bus.rewind(args.topic, args.group, args.since)) is None:
        return 1
    print(f"{args.group} on {args.topic} will read again from {args.since.isoformat()}; "
          "its handlers dedupe by event id, so nothing is paid twice")  # fmt: skip
    return 0


def cmd_redrive(args: argparse.Namespace) -> int:
    """A group's dead letters back on their topic, once the cause is fixed (pointmesh/redrive.py)."""
    if args.limit is not None and args.limit < 1:
        print("--limit: must be at least 1", file=sys.stderr)
        return 2
    settings = settings_or_exit()
    ran = _on_bus(settings, "events redrive", lambda bus: redrive(bus, args.topic, args.group, limit=args.limit))
    if ran is None:
        return 1
    done = ran[0]
    print(f"{args.group}: {done.sent} dead letters sent back on {args.topic}"
          + (f" ({done.other_groups} of other groups left for their own redrive)" if done.other_groups else "")
          + _left_hint(done, args.limit))  # fmt: skip
    for reason, count in done.reasons.most_common():
        print(f"  {count:>6}  {reason}")
    return 0


def _left_hint(done: Redriven, limit: int | None) -> str:
    """Tells the operator a run did not empty the group's dead letters, so a count is not read
    as all of them."""
    if done.more_left:
        return "; more are left (dead-lettered again or since the run started): run it again later"
    if limit is not None and done.sent >= limit:
        return f"; stopped at --limit {limit}, more may be left: run it again"
    return ""


def _purchase_event(raw: bytes) -> OutgoingEvent | str | None:
    """One line of a purchases file as its event, why it is a bad line, or None for a blank one."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return f"not UTF-8 (byte {exc.start + 1} of the line)"
    if not line.strip():
        return None
    if not line.lstrip().startswith("{"):  # json_format takes `[]` for an empty purchase
        return "not a purchase: a JSON object is expected"
    try:
        request = json_format.Parse(line, ledger_pb2.RecordPurchaseRequest())
    except json_format.ParseError as exc:
        return f"not a purchase: {exc}"
    natural = f"{request.channel}/{request.store_id}/{request.receipt_id}"
    event = OutgoingEvent(request.member_id, natural, "record_purchase", request.SerializeToString())
    if (size := event_bytes(event)) > MAX_EVENT_BYTES:
        # The bus would refuse the whole batch of 1,000 it went in: one bad line instead.
        return f"too large: {size} bytes as an event, over the bus's {MAX_EVENT_BYTES}"
    return event


def cmd_ingest_produce(args: argparse.Namespace) -> int:
    """Each line is a RecordPurchaseRequest in protobuf JSON; bad lines (not UTF-8, not a
    purchase, too large for the bus) are reported with their number, not sent."""
    settings = settings_or_exit()
    events: list[OutgoingEvent] = []
    bad = 0
    # Read as bytes and decoded line by line: a line that is not UTF-8 is one bad line, reported
    # with its number like the others, not a traceback that sends nothing.
    try:
        lines = open(args.file, "rb")  # noqa: SIM115 (closed below; opened first to fail with the reason)
    except OSError as exc:
        print(f"{args.file}: cannot read it: {exc.strerror or exc}", file=sys.stderr)
        return 1
    with lines:
        for number, raw in enumerate(lines, 1):
            read = _purchase_event(raw)
            if isinstance(read, str):
                bad += 1
                print(f"{args.file}:{number}: {read}", file=sys.stderr)
            elif read is not None:
                events.append(read)

    sent = 0

    async def run() -> str | None:
        """None once every event went, else why the bus failed (`sent` counts what went)."""
        nonlocal sent
        bus = open_bus(settings)
        try:
            await bus.ping()
            await bus.ensure_topics([INGEST_PURCHASES, dead_letter_topic(INGEST_PURCHASES)])
            for start in range(0, len(events), 1000):
                batch = events[start : start + 1000]
                await bus.publish(INGEST_PURCHASES, batch)
                sent += len(batch)
            return None
        except Exception as exc:  # any failure of the bus is reported, not traced
            return str(exc) or type(exc).__name__
        finally:
            await bus.close()

    started = time.monotonic()
    failed = asyncio.run(run())
    if failed is not None:
        print(f"{_unreachable(settings, failed)}; {sent} of {len(events)} purchases sent (sending the file again"
              " is safe: the ledger earns a receipt once)", file=sys.stderr)  # fmt: skip
        return 1
    print(f"{settings.event_bus}: {len(events)} purchases on {INGEST_PURCHASES} in {time.monotonic() - started:.1f}s"
          + (f"; {bad} bad lines not sent" if bad else ""))  # fmt: skip
    return 1 if bad else 0


def add_commands(sub: Any, date_type: Any) -> None:
    dev = sub.add_parser("dev", help="local copies of production servers").add_subparsers(dest="dev", required=True)
    kafka = dev.add_parser("kafka", help="a single-node Kafka broker (KRaft) from Maven Central jars")
    kafka.add_argument("action", choices=["start", "stop", "status"])
    kafka.set_defaults(func=cmd_dev_kafka)
    cassandra = dev.add_parser("cassandra", help="a single Apache Cassandra node from Maven Central jars")
    cassandra.add_argument("action", choices=["start", "stop", "status"])
    cassandra.set_defaults(func=cmd_dev_cassandra)
    events = sub.add_parser("events", help="the event bus").add_subparsers(dest="events_command", required=True)
    topics = events.add_parser("topics", help="topics").add_subparsers(dest="topics_command", required=True)
    topics.add_parser("create", help="create every topic (and its dead-letter topic)").set_defaults(
        func=cmd_topics_create
    )
    replay = events.add_parser("replay", help="rewind a consumer group to a time (stop its consumers first)")
    replay.add_argument("--group", required=True)
    replay.add_argument("--from", dest="since", type=date_type, required=True, help="ISO date or datetime")
    replay.add_argument("--topic", default=TOPICS[0], choices=TOPICS)
    replay.set_defaults(func=cmd_replay)
    resend = events.add_parser("redrive", help="send a consumer group's dead letters back on their topic, each once")
    resend.add_argument("--group", required=True, help="the consumer group that dead-lettered them")
    resend.add_argument("--topic", default=TOPICS[0], choices=TOPICS)
    resend.add_argument("--limit", type=int, default=None, help="at most this many")
    resend.set_defaults(func=cmd_redrive)
    ingest = sub.add_parser("ingest", help="bulk purchases").add_subparsers(dest="ingest_command", required=True)
    produce = ingest.add_parser("produce", help="write a file of purchases (JSON lines) to the ingest topic")
    produce.add_argument("file")
    produce.set_defaults(func=cmd_ingest_produce)
