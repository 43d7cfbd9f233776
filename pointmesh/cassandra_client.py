"""The one way pointmesh connects to Cassandra: token-aware, DC-aware, consistency from settings.

Retries are the driver's default policy, which never retries a write whose outcome is unknown
(a timed-out conditional write is resolved by the store reading back at SERIAL), but for one
case: a read that timed out with too few replicas answering is sent once more through another
coordinator (`ReadRetry`).
"""

from __future__ import annotations

import ssl
from typing import Any

from pointmesh.config import Settings


def contact_points(spec: str) -> tuple[list[str], int]:
    """`host:port,host:port` -> hosts and the shared port (the driver takes one port)."""
    hosts, ports = [], set()
    for part in spec.split(","):
        host, _, port = part.strip().rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"cassandra contact point {part!r}: expected host:port")
        hosts.append(host)
        ports.add(int(port))
    if len(ports) != 1:
        raise ValueError(f"cassandra contact points {spec!r} must share one port")
    return hosts, ports.pop()


def read_retry() -> Any:
    """The driver's default policy, but a read timed out with too few replicas answering goes
    once to the next coordinator. A replica killed a moment ago is still asked by coordinators
    that have not seen it go down; their reads time out at LOCAL_QUORUM though two of three
    replicas are up (the driver's default gives up at once: the ledger answered UNAVAILABLE
    for a posting, tests/cluster/test_failures.py). A read changes nothing, so asking again is
    safe; writes keep the default."""
    from cassandra.policies import RetryPolicy

    class ReadRetry(RetryPolicy):  # type: ignore[misc]
        def on_read_timeout(self, query: Any, consistency: Any, required_responses: int, received_responses: int,
                            data_retrieved: bool, retry_num: int) -> tuple[int, Any]:  # fmt: skip
            if retry_num == 0 and received_responses < required_responses:
                return self.RETRY_NEXT_HOST, None
            return super().on_read_timeout(  # type: ignore[no-any-return]
                query, consistency, required_responses, received_responses, data_retrieved, retry_num
            )

    return ReadRetry()


def connect(settings: Settings) -> tuple[Any, Any]:
    """(cluster, session); the caller shuts the cluster down."""
    from cassandra import ConsistencyLevel
    from cassandra.auth import PlainTextAuthProvider
    from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile
    from cassandra.policies import DCAwareRoundRobinPolicy, TokenAwarePolicy

    hosts, port = contact_points(settings.cassandra_contact_points)
    profile = ExecutionProfile(
        load_balancing_policy=TokenAwarePolicy(DCAwareRoundRobinPolicy(local_dc=settings.cassandra_local_dc or None)),
        consistency_level=ConsistencyLevel.name_to_value[settings.cassandra_consistency],
        serial_consistency_level=ConsistencyLevel.name_to_value[settings.cassandra_serial_consistency],
        request_timeout=settings.cassandra_request_timeout_seconds,
        retry_policy=read_retry(),
    )
    options: dict[str, Any] = {}
    if settings.cassandra_username:
        options["auth_provider"] = PlainTextAuthProvider(settings.cassandra_username, settings.cassandra_password)
    if settings.cassandra_tls_ca_file:
        context = ssl.create_default_context(cafile=settings.cassandra_tls_ca_file)
        options["ssl_context"] = context
    cluster = Cluster(hosts, port=port, protocol_version=5, execution_profiles={EXEC_PROFILE_DEFAULT: profile},
                      **options)  # fmt: skip
    return cluster, cluster.connect()
