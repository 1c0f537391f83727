"""Which incarnation of a student's history is current: the rule the publish and read share.

An event id is ``<epoch>-<seq>``; the epoch names one incarnation of the student's history,
in which sequence numbers have no holes. An incarnation must end whenever its newest
events may be gone, or the next publish would hand their numbers to other events and a
client that saw the lost ones would skip the new ones silently. It ends when:

- the student has no history meta at all (never published, expired, flushed, a restart
  without persistence): nothing says which numbers were used;
- the meta was written under the replication id a promoted replica remembers as its
  predecessor's (``master_replid2``): replication is asynchronous, so the replica may lack
  the old primary's last writes;
- the meta was written under another replication id and the node does not persist every
  write before anyone can see it. Every restart gives a node a new replication id, AOF
  included; with ``appendfsync always`` a write is on disk before its reply and its Pub/Sub
  messages leave the server, so such a restart loses nothing that a client saw and the
  incarnation goes on. A slot migrated to another primary (MIGRATE is synchronous) is the
  same case.

Whether the primaries are durable in that sense is read from their configuration
(``CONFIG GET``, which functions may not call) by :class:`Durability` and passed to the
functions (``settle`` in library.lua applies the rule). A Redis that refuses ``CONFIG``
(some managed services) counts as not durable: every restart then costs each connected
device one ``resync``, never a silent gap.

Known limit: a replica promoted by a failover, then restarted before the student's next
publish or read, no longer remembers its predecessor; on a durable node the incarnation
then goes on although the failover may have lost writes.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Mapping
from typing import Any

from redis.asyncio import RedisCluster
from redis.exceptions import ResponseError

from .redis_client import Client, text

log = logging.getLogger(__name__)

# What the read function says of the incarnation (``settle`` in library.lua): it goes on,
# there was none, or it ended.
CONTINUED, CREATED, ENDED = 0, 1, 2

# How long a probe of the primaries' configuration is trusted.
DURABILITY_REFRESH = 60.0


class Durability:
    """Whether every primary writes each command to its AOF before answering, as "1"/"0".

    Read with ``CONFIG GET`` at most once a minute, by whichever call needs it first; a
    change of configuration is seen within that minute.
    """

    def __init__(self, redis: Client) -> None:
        self._redis = redis
        self._flag = "0"
        self._next = 0.0
        self._lock = asyncio.Lock()
        self._refused_logged = False

    async def flag(self) -> str:
        if time.monotonic() >= self._next:
            async with self._lock:
                if time.monotonic() >= self._next:
                    self._flag = "1" if await self._durable() else "0"
                    self._next = time.monotonic() + DURABILITY_REFRESH
        return self._flag

    async def _durable(self) -> bool:
        try:
            if isinstance(self._redis, RedisCluster):
                # One reply per node: {address: {name: value}}.
                replies: Any = await self._redis.config_get(
                    "append*", target_nodes=RedisCluster.PRIMARIES
                )
                configs: list[Any] = list(replies.values())
            else:
                configs = [await self._redis.config_get("append*")]
        except ResponseError as exc:
            if not self._refused_logged:
                log.info("CONFIG GET refused (%s): every Redis restart will resync clients", exc)
                self._refused_logged = True
            return False
        return all(_fsyncs_always(config) for config in configs)


def new_epoch() -> str:
    """A candidate name for a new incarnation; used only if the functions start one.

    Always 8 characters: the incarnation key's layout (library.lua) has room for that.
    """
    return secrets.token_hex(4)


def _fsyncs_always(config: Mapping[Any, Any]) -> bool:
    settings = {text(name): text(value) for name, value in config.items()}
    return settings.get("appendonly") == "yes" and settings.get("appendfsync") == "always"
