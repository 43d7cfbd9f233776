"""The one way a pointmesh service opens a Redis client.

redis-py's asyncio pool refuses a command outright (MaxConnectionsError, "Too many
connections") once 100 are in use. A service under a peak has more calls in flight than that:
fraud_svc then failed its Score calls, and the ledger, told fraud_svc was away, failed to keep
the observations for later too and lost them (gateway_bench at 250 purchases/s, 2026-12-06).
Here a command past the pool's size waits for a connection instead, for as long as the caller
would wait on the socket: Redis runs one command at a time, so more connections than this
would only queue inside Redis rather than here.
"""

from __future__ import annotations

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff, NoBackoff

POOL_CONNECTIONS = 64
# How long a command waits for a free connection when the client sets no socket timeout.
WAIT_SECONDS = 5.0
# A command that failed on its connection (reset, timeout) is sent again this many times, the
# waits growing from 10 ms to at most 1 s (redis-py's own default is 10 times: a Redis away for
# good held every caller for seconds).
RETRIES = 3


def open_redis(
    url: str, *, timeout: float | None = None, connect_timeout: float | None = None, keepalive: bool = False,
    retry: bool = True, connections: int = POOL_CONNECTIONS,
) -> Redis:  # fmt: skip
    """A client on a pool of at most `connections` that waits, never refuses, when all are busy.

    `timeout` bounds each socket read and write, and the wait for a connection too (else
    WAIT_SECONDS); `retry=False` leaves a failed command to the caller at once."""
    again = Retry(ExponentialWithJitterBackoff(base=0.01, cap=1.0), RETRIES) if retry else Retry(NoBackoff(), 0)
    options: dict[str, object] = {"socket_timeout": timeout, "socket_connect_timeout": connect_timeout,
                                  "socket_keepalive": keepalive, "retry": again}  # fmt: skip
    pool = BlockingConnectionPool.from_url(
        url, max_connections=connections, timeout=timeout if timeout is not None else WAIT_SECONDS, **options
    )
    return Redis.from_pool(pool)
