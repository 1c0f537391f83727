"""Presence: how many connections a student has, across every gateway process.

Each process writes, per student it serves, its own connection count into the student's
presence hash (field = process id), and keeps a heartbeat key that expires when the process
stops refreshing it. A reader adds up the fields of live processes only, so the connections
of a killed process vanish once its heartbeat expires (``NOTIFY_PRESENCE_TTL``, 45 s).

Counts are written from the process's memory by one background task, never incremented:
writes are idempotent, can be batched when a thousand clients reconnect at once, and after
a Redis restart a single re-assertion restores the truth.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from notify.keys import Keys
from notify.redis_client import UNAVAILABLE, Client, text

log = logging.getLogger(__name__)

# A hash outlives its process fields only by this much; a live process rewrites it anyway.
HASH_TTL = 86_400


class PresenceWriter:
    def __init__(
        self, redis: Client, keys: Keys, process_id: str, ttl: int, counts: Callable[[str], int]
    ) -> None:
        self._redis = redis
        self._keys = keys
        self._process = process_id
        self._ttl = ttl
        # Refreshed three times per TTL, so one late refresh does not void the counts.
        self._refresh = ttl / 3
        self._counts = counts
        self._dirty: set[str] = set()
        self._wakeup = asyncio.Event()

    def changed(self, user: str) -> None:
        self._dirty.add(user)
        self._wakeup.set()

    async def run(self) -> None:
        """Flush changed counts and refresh the heartbeat; cancel to stop."""
        loop = asyncio.get_running_loop()
        next_beat = 0.0
        while True:
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation
            # that lands as the event is set, and this loop would outlive shutdown.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._refresh):
                    await self._wakeup.wait()
            self._wakeup.clear()
            try:
                if loop.time() >= next_beat:
                    await self._redis.set(self._keys.process(self._process), 1, ex=self._ttl)
                    next_beat = loop.time() + self._refresh
                await self._flush()
            except UNAVAILABLE as exc:
                log.warning("presence update failed, will retry: %s", exc)
                await asyncio.sleep(1.0)
                self._wakeup.set()

    async def _flush(self) -> None:
        users, self._dirty = self._dirty, set()
        if not users:
            return
        try:
            keys = self._keys
            async with self._redis.pipeline(transaction=False) as pipe:
                for user in users:
                    count = self._counts(user)
                    if count:
                        pipe.hset(keys.presence(user), self._process, count)
                        pipe.expire(keys.presence(user), HASH_TTL)
                    else:
                        pipe.hdel(keys.presence(user), self._process)
                await pipe.execute()
        except BaseException:
            self._dirty |= users
            raise

    async def withdraw(self) -> None:
        """On shutdown: drop this process's heartbeat so its counts vanish at once."""
        with contextlib.suppress(*UNAVAILABLE):
            await self._redis.delete(self._keys.process(self._process))


async def count(redis: Client, keys: Keys, user: str) -> int:
    """The student's connections on every live gateway process; dead ones are pruned."""
    raw = await redis.hgetall(keys.presence(user))
    counts = {text(process_id): int(n) for process_id, n in raw.items()}
    if not counts:
        return 0
    async with redis.pipeline(transaction=False) as pipe:
        for process_id in counts:
            pipe.exists(keys.process(process_id))
        alive = dict(zip(counts, await pipe.execute(), strict=True))
    dead = [process_id for process_id, live in alive.items() if not live]
    if dead:
        await redis.hdel(keys.presence(user), *dead)
    return sum(n for process_id, n in counts.items() if alive[process_id])
