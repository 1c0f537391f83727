"""The process's one Redis Pub/Sub connection, and the probe that proves it delivers.

Written on a bare redis-py connection rather than its PubSub helper so that reconnection is
explicit: a dropped connection means frames were published that this process never saw,
and the hub must hold every student's live stream and refill it from history once the
subscriptions are confirmed again. A helper that silently reconnects would hide that gap.

A connection can also look healthy while delivering nothing (a half-open TCP connection, a
subscription lost on the server side). So the process publishes to a probe channel of its
own every second, through its ordinary Redis client, and expects to read it back here; when
the probe stops arriving the process reports not ready and replaces the connection, which
triggers the same catch-up as any other loss.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection, ConnectionPool
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

log = logging.getLogger(__name__)

# SUBSCRIBE arguments per command when restoring many channels after a reconnect.
_RESUBSCRIBE_CHUNK = 1000
_BACKOFF_MIN, _BACKOFF_MAX = 0.1, 5.0
PROBE_INTERVAL = 1.0
# No probe read back for this long: the connection is not delivering and is replaced.
PROBE_DEADLINE = 3.0


class Reader:
    def __init__(self, redis_url: str, probe_channel: str) -> None:
        # RESP2: Pub/Sub replies are plain arrays that read_response returns; under RESP3
        # (redis-py 8's default) they are push messages its parser keeps to itself.
        self._pool = ConnectionPool.from_url(
            redis_url, protocol=2, socket_connect_timeout=PROBE_DEADLINE
        )
        self._conn: AbstractConnection | None = None
        self._probe_channel = probe_channel
        self._probe_bytes = probe_channel.encode()
        self._probe_seen = 0.0
        self._wanted: set[str] = set()
        self._confirmed: set[str] = set()
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}
        # One ordered queue for SUBSCRIBE/UNSUBSCRIBE, so a quick leave-then-join of the same
        # student reaches Redis in that order and the channel ends up subscribed.
        self._commands: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
        # Per channel, commands queued or sent whose reply has not arrived. A subscribe reply
        # confirms a channel only when nothing newer is outstanding: an old reply must not
        # vouch for a channel whose UNSUBSCRIBE (and new SUBSCRIBE) are still on their way.
        self._outstanding: dict[str, int] = {}
        self._on_message: Callable[[bytes, bytes], None] = lambda _c, _f: None
        self._on_lost: Callable[[], None] = lambda: None
        self._on_restored: Callable[[], None] = lambda: None
        self.connected = asyncio.Event()

    @property
    def delivering(self) -> bool:
        """Connected, and the last probe came back recently: the readiness signal."""
        return self.connected.is_set() and time.monotonic() - self._probe_seen < PROBE_DEADLINE

    def attach(
        self,
        on_message: Callable[[bytes, bytes], None],
        on_lost: Callable[[], None],
        on_restored: Callable[[], None],
    ) -> None:
        self._on_message, self._on_lost, self._on_restored = on_message, on_lost, on_restored

    async def subscribe(self, channel: str) -> None:
        """Subscribe ``channel`` (if not already) and wait until Redis confirmed it."""
        self._wanted.add(channel)
        if channel in self._confirmed:
            return
        waiter = asyncio.get_running_loop().create_future()
        waiters = self._waiters.setdefault(channel, [])
        waiters.append(waiter)
        # Sent even if an earlier SUBSCRIBE is on its way: repeating one is harmless, and
        # that earlier one may be followed by an UNSUBSCRIBE.
        self._queue("SUBSCRIBE", channel)
        try:
            await waiter
        finally:
            if waiter in waiters:
                waiters.remove(waiter)
            if not waiters and self._waiters.get(channel) is waiters:
                del self._waiters[channel]

    def unsubscribe(self, channel: str) -> None:
        self._wanted.discard(channel)
        self._confirmed.discard(channel)
        self._queue("UNSUBSCRIBE", channel)

    def _queue(self, command: str, channel: str) -> None:
        self._outstanding[channel] = self._outstanding.get(channel, 0) + 1
        self._commands.put_nowait((command, channel))

    async def run(self) -> None:
        """Read forever, reconnecting with capped backoff; cancel to stop."""
        backoff = _BACKOFF_MIN
        first = True
        while True:
            try:
                conn = self._pool.make_connection()  # type: ignore[no-untyped-call]
                await conn.connect()
                self._conn = conn
                # What was queued while disconnected is covered by restoring ``_wanted``.
                while not self._commands.empty():
                    self._commands.get_nowait()
                self._outstanding.clear()
                await self._restore(conn)
                self._probe_seen = time.monotonic()
                self.connected.set()
                if not first:
                    log.info("pubsub reconnected; catching connections up from history")
                    self._on_restored()
                first = False
                backoff = _BACKOFF_MIN
                sender = asyncio.create_task(self._send_loop(conn))
                try:
                    await self._read(conn)
                finally:
                    sender.cancel()
            except (RedisError, OSError) as exc:
                self._lost(f"pubsub connection lost: {exc}")
            except Exception:
                # Anything unexpected must not end the reader: connections would stay open
                # and silent. Treat it as a lost connection, which catches everyone up.
                log.exception("pubsub reader failed; reconnecting")
                self._lost("pubsub reader failed")
            finally:
                await self._drop()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, _BACKOFF_MAX)

    def _lost(self, why: str) -> None:
        if self.connected.is_set():
            log.warning("%s", why)
            self.connected.clear()
            self._on_lost()

    async def probe(self, redis: Redis) -> None:
        """Publish to the probe channel forever; cancel to stop."""
        while True:
            with contextlib.suppress(RedisError, OSError):
                await redis.publish(self._probe_channel, b"")
            await asyncio.sleep(PROBE_INTERVAL)

    async def _restore(self, conn: AbstractConnection) -> None:
        channels = [self._probe_channel, *sorted(self._wanted)]
        self._confirmed.clear()
        for channel in channels:
            self._outstanding[channel] = 1
        for start in range(0, len(channels), _RESUBSCRIBE_CHUNK):
            await conn.send_command(
                "SUBSCRIBE", *channels[start : start + _RESUBSCRIBE_CHUNK], check_health=False
            )
        pending = set(channels)
        while pending:
            reply = await conn.read_response(disable_decoding=True, timeout=PROBE_DEADLINE)
            if reply is None:
                raise RedisTimeoutError("pubsub subscriptions not confirmed")
            self._handle(reply)
            if reply[0] == b"subscribe":
                pending.discard(reply[1].decode())

    async def _send_loop(self, conn: AbstractConnection) -> None:
        while True:
            command, channel = await self._commands.get()
            try:
                await conn.send_command(command, channel, check_health=False)
            except (RedisError, OSError) as exc:
                # The read side sees the same failure and reconnects; nothing to add here.
                log.debug("pubsub %s failed: %s", command, exc)
                return

    async def _read(self, conn: AbstractConnection) -> None:
        while True:
            # With an explicit timeout redis-py returns None instead of raising.
            reply = await conn.read_response(disable_decoding=True, timeout=PROBE_INTERVAL)
            if reply is not None:
                self._handle(reply)
            if time.monotonic() - self._probe_seen > PROBE_DEADLINE:
                raise RedisTimeoutError("the pubsub probe did not come back")

    def _handle(self, reply: list[bytes]) -> None:
        """Route one Pub/Sub reply: a message to the hub, a confirmation to its waiters."""
        kind = reply[0]
        if kind == b"message":
            if reply[1] == self._probe_bytes:
                self._probe_seen = time.monotonic()
            else:
                self._on_message(reply[1], reply[2])
        elif kind in (b"subscribe", b"unsubscribe"):
            channel = reply[1].decode()
            left = self._outstanding.get(channel, 1) - 1
            if left > 0:
                self._outstanding[channel] = left
                return
            self._outstanding.pop(channel, None)
            if kind == b"subscribe":
                self._confirm(channel)

    def _confirm(self, channel: str) -> None:
        if channel not in self._wanted:
            return
        self._confirmed.add(channel)
        for waiter in self._waiters.get(channel, ()):
            if not waiter.done():
                waiter.set_result(None)

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        self._confirmed.clear()
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.disconnect()

    async def close(self) -> None:
        await self._drop()
        await self._pool.disconnect()
