"""The one way processes open their Redis client, on a single node or a Redis Cluster.

After a Redis restart or failover every pooled connection is dead. redis-py retries a
command on a fresh connection only for the errors named in ``retry_on_error``; without it a
stale connection fails the first command, and for the gateway that would close clients that
could have been caught up. Only connection errors are retried, never timeouts: a timed-out
command may have run, and the caller decides whether repeating it is safe (the bridge's
publishes carry dedupe keys; the API's carry them when the caller gives an idempotency key).
redis-py adds ``retry_on_error`` to the Retry's own error list, so that list is set too.

Commands are packed by hiredis: redis-py's asyncio connections pack them in Python (only its
sync ones can use hiredis), which was 40 % of the bridge's CPU under a backlog (cProfile).

With ``REDIS_CLUSTER=1`` the client is redis-py's ``RedisCluster``: it learns the slot map
from the URL's node and follows MOVED and failovers itself. Every key of one student shares
the hash tag ``{u:<id>}`` (see :mod:`keys`), so each of the student's commands, function calls and
transactions stays inside one slot.
"""

from __future__ import annotations

import traceback
from typing import Any

import hiredis
import redis.asyncio.connection
from redis.asyncio import Redis, RedisCluster
from redis.asyncio.cluster import ClusterPipeline
from redis.asyncio.connection import AbstractConnection, Connection, parse_url
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException, RedisError

# No command here blocks on the server, so a reply slower than this means a frozen or
# unreachable Redis: fail, and let the caller's retry (or resync) take over.
SOCKET_TIMEOUT = 5.0

# What every module that talks to Redis accepts: the commands they use exist on both.
Client = Redis | RedisCluster

# Redis did not answer, or answered with an error. Catch this, not RedisError: redis-py's
# cluster client raises RedisClusterException, which is not a RedisError, when it cannot
# reach any node (a gateway started before its cluster, a network blip).
UNAVAILABLE: tuple[type[Exception], ...] = (RedisError, RedisClusterException, OSError)


def text(value: bytes | str) -> str:
    """A reply's string: bytes from a client without ``decode_responses``, str with it."""
    return value.decode() if isinstance(value, bytes) else value


class _HiredisPacking:
    def pack_command(self, *args: Any) -> list[bytes]:
        # As redis-py: a command name such as "SCRIPT EXISTS" is sent as two arguments.
        if isinstance(args[0], str) and " " in args[0]:
            args = (*args[0].split(), *args[1:])
        return [hiredis.pack_command(args)]


class _Cluster(RedisCluster):
    """redis-py's cluster client, with function calls routed from their own keys, and one of
    its races reported as the error it means.

    On CLUSTERDOWN, on a failed re-read of the slot map and when a pipeline starts over,
    redis-py closes the connections of every node, those that other tasks are writing to or
    reading from at that moment included. Those tasks then fail inside redis-py's
    connection code with AttributeError or TypeError on the closed stream
    (redis/redis-py#3546) instead of a ConnectionError. Reproduced with 100 concurrent
    publishes through a master's failover (tests/test_cluster.py). Only errors raised in
    that socket code are translated, so a bug of ours still surfaces as itself.
    """

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().execute_command(*args, **kwargs)
        except (AttributeError, TypeError) as exc:
            raise _lost(exc) from exc

    async def _determine_slot(self, command: str, *args: Any) -> int:
        # An FCALL names its keys as EVALSHA does (name, count, keys), but redis-py asks a
        # node for them (COMMAND GETKEYS) on every call, outside its retry loop: a round
        # trip more per publish, and after a failover the dead node it asked failed every
        # publish until the slot map was next re-read, a minute later.
        if isinstance(command, str) and command.upper() in ("FCALL", "FCALL_RO"):
            command = "EVALSHA"
        return await super()._determine_slot(command, *args)

    def pipeline(self, transaction: Any = None, shard_hint: Any = None) -> ClusterPipeline:
        if shard_hint:
            return super().pipeline(transaction, shard_hint)  # redis-py's own refusal
        # redis-py's own class is abstract to mypy (an attribute its __init__ sets).
        return _ClusterPipeline(self, transaction)  # type: ignore[abstract]


class _ClusterPipeline(ClusterPipeline):
    async def execute(self, raise_on_error: bool = True, allow_redirections: bool = True) -> Any:
        try:
            results = await super().execute(raise_on_error, allow_redirections)
        except (AttributeError, TypeError) as exc:
            raise _lost(exc) from exc
        # Without raise_on_error, a node's failure comes back as its commands' results.
        return [
            _lost(result) if isinstance(result, AttributeError | TypeError) else result
            for result in results
        ]


def _lost(error: Exception) -> Exception:
    """``error`` as a ConnectionError if redis-py's socket code raised it, else itself."""
    frames = traceback.extract_tb(error.__traceback__)
    if frames and frames[-1].filename == _CONNECTION_MODULE:
        return RedisConnectionError(f"connection closed while in use ({error!r})")
    return error


_CONNECTION_MODULE = redis.asyncio.connection.__file__


def client(url: str, cluster: bool = False) -> Client:
    # The URL picks TCP, TLS or a Unix socket; packing is mixed into whichever it is.
    kind: type[AbstractConnection] = parse_url(url).get("connection_class", Connection)
    packed = type(f"Hiredis{kind.__name__}", (_HiredisPacking, kind), {})
    options: dict[str, Any] = {
        "connection_class": packed,
        "socket_timeout": SOCKET_TIMEOUT,
        "socket_connect_timeout": SOCKET_TIMEOUT,
        "retry": Retry(
            ExponentialBackoff(cap=1.0, base=0.05), 3, supported_errors=(RedisConnectionError,)
        ),
        "retry_on_error": [RedisConnectionError],
    }
    if cluster:
        return _Cluster.from_url(url, **options)
    return Redis.from_url(url, **options)
