"""The publish contract every producer uses: bridge, HTTP API and CLI alike.

One Lua script does, atomically for one student: skip a notification whose dedupe key was
already published (returning the original id), start a new history incarnation (epoch) if
the student has none or its keys now live on another node (a promoted replica, a migrated
slot), take the next sequence number, append the finished event frame to the bounded
history stream, refresh the expiry, and SPUBLISH the same frame on the student's channel.
Because history and live delivery come from a single step, a gateway that reads history
after subscribing can never see a hole between them.

The channel is a shard channel (SPUBLISH, Redis >= 7) on a single node and in a cluster
alike: in a cluster it then goes only to the nodes of its slot's shard, where the
student's history already lives, instead of being broadcast over the whole cluster bus.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio.client import Pipeline
from redis.asyncio.cluster import ClusterPipeline

from . import keys
from .config import HistorySettings
from .protocol import EventId, event_body, parse_event_id
from .redis_client import Client, text

# KEYS: meta, history[, dedupe]. ARGV: channel, candidate epoch, frame body, history size,
# history ttl, dedupe ttl. Returns {id, 1} when published, {id, 0} for a duplicate.
_PUBLISH = """
local dedupe = KEYS[3]
if dedupe then
  local prior = redis.call('GET', dedupe)
  if prior then return {prior, 0} end
end
-- The node's replication id changes when a replica is promoted. Asynchronous replication
-- may have lost the old primary's last events, and continuing its sequence would hand
-- their ids to other events: a client that saw the lost ones would skip the new ones.
local replid = string.match(redis.call('INFO', 'replication'), 'master_replid:(%x+)')
local meta = redis.call('HMGET', KEYS[1], 'epoch', 'replid')
local epoch = meta[1]
if not epoch or meta[2] ~= replid then
  -- A new incarnation. A history that outlived its meta (eviction, a manual DEL) or its
  -- primary belongs to the old one: its ids would collide with the new sequence.
  epoch = ARGV[2]
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'replid', replid, 'seq', 0)
end
local seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
local id = epoch .. '-' .. seq
local frame = '{"type":"event","id":"' .. id .. '",' .. ARGV[3]
redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[4], '0-' .. seq, 'f', frame)
redis.call('EXPIRE', KEYS[1], ARGV[5])
redis.call('EXPIRE', KEYS[2], ARGV[5])
if dedupe then redis.call('SET', dedupe, id, 'EX', ARGV[6]) end
redis.call('SPUBLISH', ARGV[1], frame)
return {id, 1}
"""


@dataclass(frozen=True, slots=True)
class Notification:
    """One event for one user, as producers hand it to the publish contract."""

    user_id: str
    event: str
    data: dict[str, Any] = field(default_factory=dict)
    invalidate: tuple[str, ...] = ()
    # An event id or idempotency key: a second publish with the same key for the same user
    # within the dedupe window returns the first id and delivers nothing.
    dedupe_key: str | None = None


@dataclass(frozen=True, slots=True)
class Published:
    id: EventId
    duplicate: bool


@dataclass(frozen=True, slots=True)
class Sent:
    """What :meth:`Publisher.invalidate_then_publish` did, in the order it was asked."""

    # Per cache key: 1 if it existed (and is now deleted), 0 if it was already gone.
    deleted: list[int]
    # Per notification: its id, or why it was not published. A TypeError: its data cannot
    # be encoded (found before anything was sent). A ResponseError, or in a cluster a
    # node's connection error: what Redis answered for it.
    results: list[Published | Exception]


Pipe = Pipeline | ClusterPipeline


class Publisher:
    def __init__(self, redis: Client, history: HistorySettings) -> None:
        self._redis = redis
        self._sha = hashlib.sha1(_PUBLISH.encode()).hexdigest()  # noqa: S324 - Redis's script id
        self._history = history

    async def publish(self, notification: Notification) -> Published:
        """Publish one notification; raises what stopped it."""
        [result] = (await self.invalidate_then_publish((), [notification])).results
        if isinstance(result, Exception):
            raise result
        return result

    async def invalidate_then_publish(
        self,
        cache_keys: Sequence[str],
        notifications: Sequence[Notification],
        atomic: bool = False,
    ) -> Sent:
        """Delete the backend's cache keys, then publish: the order every producer keeps.

        An app refetches when the notification arrives, so the push must never overtake
        the DEL of the cache it will read. Two steps, not one pipeline: a cluster runs each
        node's share of a pipeline concurrently, so the push could overtake a DEL. With
        ``atomic`` the publishes are one MULTI/EXEC (all of them in one slot, in a
        cluster). A failure of either step as a whole (Redis unreachable) raises; nothing
        was published if the first step raised.
        """
        deleted: list[int] = []
        if cache_keys:
            async with self._redis.pipeline(transaction=False) as pipe:
                for key in cache_keys:  # one DEL per key: in a cluster they may sit in any slot
                    pipe.delete(key)
                deleted = list(await pipe.execute())
        unencodable: dict[int, Exception] = {}
        async with self._redis.pipeline(transaction=atomic) as pipe:
            for index, notification in enumerate(notifications):
                try:
                    self._queue(notification, pipe)
                except TypeError as exc:  # orjson: nesting too deep, non-string keys
                    unencodable[index] = exc
            queued = len(notifications) - len(unencodable)
            replies = iter(await self._execute(pipe) if queued else [])
        results = [
            unencodable[index] if index in unencodable else _outcome(next(replies))
            for index in range(len(notifications))
        ]
        return Sent(deleted, results)

    def _queue(self, notification: Notification, pipe: Pipe) -> None:
        """Add the publish to ``pipe``; its result is ``parse_result`` of that pipeline slot.

        Sent as a plain EVALSHA: redis-py refuses script objects in cluster pipelines, and
        :meth:`_execute` makes sure the script is there, on one node or on every primary.
        """
        script_keys, args = self._call(notification)
        pipe.execute_command("EVALSHA", self._sha, len(script_keys), *script_keys, *args)

    async def _execute(self, pipe: Pipe) -> list[Any]:
        """Run ``pipe`` once every primary has the script.

        A restarted node, and a replica promoted by a failover, start without it (scripts
        are not replicated). The check costs one round trip per pipeline; if a node loses the
        script between the check and the pipeline, the publish fails with NOSCRIPT and the
        caller retries, as for any other Redis error.
        """
        if not all(await self._redis.script_exists(self._sha)):
            await self._redis.script_load(_PUBLISH)
        return list(await pipe.execute(raise_on_error=False))

    def _call(self, notification: Notification) -> tuple[list[str], list[str | bytes | int]]:
        user = notification.user_id
        script_keys = [keys.meta(user), keys.history(user)]
        if notification.dedupe_key is not None:
            script_keys.append(keys.dedupe(user, notification.dedupe_key))
        body = event_body(
            notification.event,
            notification.data,
            list(notification.invalidate),
            time.time_ns() // 1_000_000,
        )
        args: list[str | bytes | int] = [
            keys.channel(user),
            new_epoch(),
            body,
            self._history.size,
            self._history.ttl,
            self._history.dedupe_ttl,
        ]
        return script_keys, args


def parse_result(raw: Sequence[Any]) -> Published:
    event_id = parse_event_id(text(raw[0]))
    if event_id is None:
        raise ValueError(f"publish script returned a malformed id: {raw[0]!r}")
    return Published(event_id, duplicate=int(raw[1]) == 0)


def _outcome(reply: Any) -> Published | Exception:
    return reply if isinstance(reply, Exception) else parse_result(reply)


def new_epoch() -> str:
    """A fresh history incarnation name; only used when the student has none yet."""
    return secrets.token_hex(4)
