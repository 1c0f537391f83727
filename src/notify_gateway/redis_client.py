"""The one way processes open their Redis client.

After a Redis restart or failover every pooled connection is dead. redis-py retries a
command on a fresh connection only for the errors named in ``retry_on_error``; without it a
stale connection fails the first command, and for the gateway that would close clients that
could have been caught up. Only connection errors are retried: the command never reached
the server, so even a non-idempotent publish cannot run twice.
"""

from __future__ import annotations

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError


def client(url: str) -> Redis:
    return Redis.from_url(
        url,
        retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), 3),
        retry_on_error=[RedisConnectionError],
    )
