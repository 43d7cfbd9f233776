"""The one way a pointmesh service opens a Redis client.

redis-py's asyncio pool refuses a command outright (MaxConnectionsError, "Too many
connections") once 100 are in use. A service under a peak has more calls in flight than that:
fraud_svc then failed its Score calls, and the ledger, told fraud_svc was away, failed to keep
the observations for later too and lost them (gateway_bench at 250 purchases/s, 2026-12-06).
Here a command past the pool's size waits for a connection instead, up to WAIT_SECONDS unless
the caller says otherwise: Redis runs one command at a time, so more connections than
POOL_CONNECTIONS would only queue inside Redis rather than here. A command queued behind 64 busy
ones is not talking to a dead peer, so its wait is not the socket timeout. A client whose every
call has a fallback (the balance cache, the gateway's key lookup) waits no longer than its
socket timeout and takes the fallback.

A client whose connections block (stream tails: XREAD BLOCK holds its connection for up to a
second, gives it back and takes one again at once) needs a pool larger than its tails: a waiting
command is not served first, so with every connection held by a tail the others waited in vain
(64 tails on a pool of 64 stopped the ledger's outbox relay). `bus_redis` opens one of
BUS_CONNECTIONS.

Everything else is redis-py's: its socket timeouts and keepalive unless the caller sets them,
and no retry of a failed command (a caller that retries does it with its own backoff).
"""

from __future__ import annotations

from redis.asyncio import BlockingConnectionPool, Redis

POOL_CONNECTIONS = 64
BUS_CONNECTIONS = 4096
# How long a command waits for a free connection unless the caller sets `wait`.
WAIT_SECONDS = 5.0


def open_redis(
    url: str, *, timeout: float | None = None, connect_timeout: float | None = None, keepalive: bool | None = None,
    connections: int = POOL_CONNECTIONS, wait: float = WAIT_SECONDS,
) -> Redis:  # fmt: skip
    """A client on a pool of at most `connections`: a command finding all busy waits up to
    `wait` seconds for one, then fails with ConnectionError ("No connection available").

    `timeout` bounds each socket read and write; left unset, redis-py's defaults apply."""
    options: dict[str, object] = {}
    for name, value in (("socket_timeout", timeout), ("socket_connect_timeout", connect_timeout),
                        ("socket_keepalive", keepalive)):  # fmt: skip
        if value is not None:
            options[name] = value
    pool = BlockingConnectionPool.from_url(url, max_connections=connections, timeout=wait, **options)
    return Redis.from_pool(pool)
