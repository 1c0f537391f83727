"""The publish contract every producer uses: bridge, HTTP API and CLI alike.

One Lua script does, atomically for one student: skip a notification whose dedupe key was
already published (returning the original id) or whose Kafka offset was, settle which
history incarnation (epoch) is current (:mod:`.incarnation`), take the next sequence
number, append the finished event frame to the bounded history stream, refresh the
expiries, and SPUBLISH the same frame on the student's channel.
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

from . import incarnation
from .config import HistorySettings
from .incarnation import Durability
from .keys import Keys
from .protocol import EventId, event_body, parse_event_id
from .redis_client import Client, text

# KEYS: meta, history, dedupe. ARGV: channel, candidate epoch, frame body, history size,
# history ttl, position ttl, dedupe ttl, durable flag, then for an event read from Kafka its
# partition ("<topic>/<partition>"), offset and timestamp (ms). Returns {id, 1} when
# published, {id, 0} for a duplicate (the first publish's id, or the current one for a
# replayed Kafka offset).
_PUBLISH = (
    incarnation.LUA
    + """
local prior = redis.call('GET', KEYS[3])
if prior then return {prior, 0} end
local epoch, seq = incarnation(KEYS[1], KEYS[2], ARGV[2], ARGV[8], ARGV[6])
local partition = ARGV[9]
local newest = ARGV[11]
if partition then
  -- The highest offset of this partition already published for the student, and the
  -- newest timestamp up to it. Anything at or below both is a replay (a new consumer
  -- group, an offset reset), even long after its dedupe key expired. A recreated topic
  -- starts its offsets again, but with newer timestamps, so it is not taken for a replay.
  local seen = redis.call('HMGET', KEYS[1], 'ko:' .. partition, 'kt:' .. partition)
  if seen[1] and tonumber(ARGV[10]) <= tonumber(seen[1])
     and tonumber(ARGV[11]) <= tonumber(seen[2]) then
    return {epoch .. '-' .. seq, 0}
  end
  if seen[2] and tonumber(seen[2]) > tonumber(newest) then newest = seen[2] end
end
seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
local id = epoch .. '-' .. seq
local frame = '{"type":"event","id":"' .. id .. '",' .. ARGV[3]
redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[4], '0-' .. seq, 'f', frame)
if partition then
  redis.call('HSET', KEYS[1], 'ko:' .. partition, ARGV[10], 'kt:' .. partition, newest)
end
redis.call('EXPIRE', KEYS[1], ARGV[6])
redis.call('EXPIRE', KEYS[2], ARGV[5])
redis.call('SET', KEYS[3], id, 'EX', ARGV[7])
redis.call('SPUBLISH', ARGV[1], frame)
return {id, 1}
"""
)

# A notification published without a dedupe key gets one anyway, remembered this long:
# redis-py re-sends a command whose reply was lost with the connection (it may have run),
# and within this window such a retry returns the first id instead of publishing twice.
RETRY_WINDOW = 60


@dataclass(frozen=True, slots=True)
class Source:
    """Where a notification's event was read in Kafka."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int


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
    # For an event read from Kafka: a replay of its offset notifies nothing, for as long
    # as the student's position is kept.
    source: Source | None = None


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
    def __init__(
        self, redis: Client, keys: Keys, history: HistorySettings, durability: Durability
    ) -> None:
        self._redis = redis
        self._keys = keys
        self._sha = hashlib.sha1(_PUBLISH.encode()).hexdigest()  # noqa: S324 - Redis's script id
        self._history = history
        self._durability = durability

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
        durable = await self._durability.flag()
        async with self._redis.pipeline(transaction=atomic) as pipe:
            for index, notification in enumerate(notifications):
                try:
                    self._queue(notification, durable, pipe)
                except TypeError as exc:  # orjson: nesting too deep, non-string keys
                    unencodable[index] = exc
            queued = len(notifications) - len(unencodable)
            replies = iter(await self._execute(pipe) if queued else [])
        results = [
            unencodable[index] if index in unencodable else _outcome(next(replies))
            for index in range(len(notifications))
        ]
        return Sent(deleted, results)

    def _queue(self, notification: Notification, durable: str, pipe: Pipe) -> None:
        """Add the publish to ``pipe``; its result is ``parse_result`` of that pipeline slot.

        Sent as a plain EVALSHA: redis-py refuses script objects in cluster pipelines, and
        :meth:`_execute` makes sure the script is there, on one node or on every primary.
        """
        script_keys, args = self._call(notification, durable)
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

    def _call(
        self, notification: Notification, durable: str
    ) -> tuple[list[str], list[str | bytes | int]]:
        user, keys, history = notification.user_id, self._keys, self._history
        if notification.dedupe_key is None:
            dedupe, dedupe_ttl = f"retry:{secrets.token_hex(8)}", RETRY_WINDOW
        else:
            dedupe, dedupe_ttl = notification.dedupe_key, history.dedupe_ttl
        body = event_body(
            notification.event,
            notification.data,
            list(notification.invalidate),
            time.time_ns() // 1_000_000,
        )
        args: list[str | bytes | int] = [
            keys.channel(user),
            incarnation.new_epoch(),
            body,
            history.size,
            history.ttl,
            history.position_ttl,
            dedupe_ttl,
            durable,
        ]
        source = notification.source
        if source is not None:
            args += [f"{source.topic}/{source.partition}", source.offset, source.timestamp_ms]
        return [keys.meta(user), keys.history(user), keys.dedupe(user, dedupe)], args


def parse_result(raw: Sequence[Any]) -> Published:
    event_id = parse_event_id(text(raw[0]))
    if event_id is None:
        raise ValueError(f"publish script returned a malformed id: {raw[0]!r}")
    return Published(event_id, duplicate=int(raw[1]) == 0)


def _outcome(reply: Any) -> Published | Exception:
    return reply if isinstance(reply, Exception) else parse_result(reply)
