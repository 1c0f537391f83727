"""Which students this process serves, and the fan-out of their frames.

The hub owns the mapping student -> open connections. It asks the Pub/Sub reader to
subscribe a student's channel when the first device connects and to unsubscribe when the
last one leaves. Fan-out is synchronous: each event's WebSocket frame is built once for the
process and the same bytes are written to every connection of the student (or queued on
the ones not reading), so the reader never waits on a socket.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable

from .. import keys
from ..protocol import CloseCode, event_id_of
from .connection import Connection
from .metrics import GatewayMetrics
from .reader import Reader
from .socket import WriteBatch, text_frame

SUBSCRIBE_TIMEOUT = 5.0


class JoinRefused(Exception):
    def __init__(self, code: CloseCode, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class Hub:
    def __init__(
        self,
        reader: Reader,
        max_per_user: int,
        on_change: Callable[[str], None],
        metrics: GatewayMetrics,
    ) -> None:
        self._reader = reader
        self._max_per_user = max_per_user
        # Told which student's connection count changed (presence).
        self._on_change = on_change
        self._users: dict[str, set[Connection]] = {}
        self._count = 0
        self._fanout = metrics.fanout
        # Frames for one socket from one read of the Pub/Sub connection go out in one write.
        self.batch = WriteBatch()
        reader.attach(
            self.dispatch, self.pause, self.resume, self.batch.end, metrics.pubsub_reconnects.inc
        )

    @property
    def connection_count(self) -> int:
        return self._count

    def connections(self, user: str) -> int:
        return len(self._users.get(user, ()))

    async def join(self, conn: Connection) -> None:
        """Register ``conn``; returns once its student's channel is subscribed."""
        conns = self._users.setdefault(conn.user, set())
        if len(conns) >= self._max_per_user:
            raise JoinRefused(CloseCode.TOO_MANY_CONNECTIONS, "too many connections")
        conns.add(conn)
        self._count += 1
        self._on_change(conn.user)
        try:
            async with asyncio.timeout(SUBSCRIBE_TIMEOUT):
                await self._reader.subscribe(keys.channel(conn.user))
        except TimeoutError:
            self.leave(conn)
            raise JoinRefused(CloseCode.TRY_AGAIN_LATER, "subscription unavailable") from None
        except BaseException:
            self.leave(conn)  # cancelled (shutdown): do not stay registered
            raise

    def leave(self, conn: Connection) -> None:
        conns = self._users.get(conn.user)
        if conns is None or conn not in conns:
            return
        conns.discard(conn)
        self._count -= 1
        self._on_change(conn.user)
        if not conns:
            del self._users[conn.user]
            self._reader.unsubscribe(keys.channel(conn.user))

    def dispatch(self, channel: bytes, frame: bytes) -> None:
        user = keys.user_of_channel(channel)
        conns = self._users.get(user) if user is not None else None
        if not conns:
            return
        self.batch.begin()
        event_id = event_id_of(frame)
        try:
            frame.decode()
        except UnicodeDecodeError:
            # The publish script writes UTF-8; a text frame of anything else published on
            # the channel by hand would make clients fail the connection (1007).
            frame = frame.decode(errors="replace").encode()
        wire = text_frame(frame)
        size = len(wire)
        for conn in conns:
            conn.deliver(event_id, wire, size)
        fanout = self._fanout
        fanout.pushed["live"] += len(conns)
        fanout.bytes += size * len(conns)
        published_ms = _ts(frame)
        if published_ms is not None:
            fanout.observe_latency(max(0.0, time.time() - published_ms / 1000))

    def pause(self, channels: Iterable[str]) -> None:
        """These channels lost their subscription: frames published from now on are unseen."""
        for user in self._served(channels):
            for conn in self._users[user]:
                conn.hold()

    def resume(self, channels: Iterable[str]) -> None:
        """These channels are subscribed again: fill their connections' gaps from history.

        Redis may have restarted and lost presence too, so their counts are rewritten.
        """
        for user in self._served(channels):
            self._on_change(user)
            for conn in self._users[user]:
                conn.request_catch_up()

    def _served(self, channels: Iterable[str]) -> list[str]:
        users = (keys.user_of_channel(channel.encode()) for channel in channels)
        return [user for user in users if user is not None and user in self._users]


def _ts(frame: bytes) -> int | None:
    """The publish time an event frame ends with (``"ts":<ms>}``), read without parsing it."""
    tail = frame[-24:]
    start = tail.rfind(b'"ts":')
    if start < 0 or not tail.endswith(b"}"):
        return None
    digits = tail[start + 5 : -1]
    return int(digits) if digits.isdigit() else None
