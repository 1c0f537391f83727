"""The publish contract every producer uses: bridge, HTTP API and CLI alike.

One Lua script does, atomically for one student: skip a notification whose dedupe key was
already published (returning the original id), take the next sequence number, append the
finished event frame to the bounded history stream, refresh the expiry, and PUBLISH the
same frame on the student's channel. Because history and live delivery come from a single
step, a gateway that reads history after subscribing can never see a hole between them.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline

from . import keys
from .config import HistorySettings
from .protocol import EventId, event_body, parse_event_id

# KEYS: meta, history[, dedupe]. ARGV: channel, candidate epoch, frame body, history size,
# history ttl, dedupe ttl. Returns {id, 1} when published, {id, 0} for a duplicate.
_PUBLISH = """
local dedupe = KEYS[3]
if dedupe then
  local prior = redis.call('GET', dedupe)
  if prior then return {prior, 0} end
end
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then
  -- A new incarnation. A history that outlived its meta (eviction, a manual DEL) belongs
  -- to the old one: its ids would collide with the new sequence.
  epoch = ARGV[2]
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'epoch', epoch)
end
local seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
local id = epoch .. '-' .. seq
local frame = '{"type":"event","id":"' .. id .. '",' .. ARGV[3]
redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[4], '0-' .. seq, 'f', frame)
redis.call('EXPIRE', KEYS[1], ARGV[5])
redis.call('EXPIRE', KEYS[2], ARGV[5])
if dedupe then redis.call('SET', dedupe, id, 'EX', ARGV[6]) end
redis.call('PUBLISH', ARGV[1], frame)
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


class Publisher:
    def __init__(self, redis: Redis, history: HistorySettings) -> None:
        self._script = redis.register_script(_PUBLISH)
        self._history = history

    async def publish(self, notification: Notification) -> Published:
        return parse_result(await self._script(*self._call(notification)))

    async def queue(self, notification: Notification, pipe: Pipeline) -> None:
        """Add the publish to ``pipe``; its result is ``parse_result`` of that pipeline slot."""
        await self._script(*self._call(notification), client=pipe)

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
    event_id = parse_event_id(raw[0].decode() if isinstance(raw[0], bytes) else raw[0])
    if event_id is None:
        raise ValueError(f"publish script returned a malformed id: {raw[0]!r}")
    return Published(event_id, duplicate=int(raw[1]) == 0)


def new_epoch() -> str:
    """A fresh history incarnation name; only used when the student has none yet."""
    return secrets.token_hex(4)
