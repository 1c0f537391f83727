"""Which students this process serves, and the fan-out of their frames.

The hub owns the mapping student -> open sessions. It asks the Pub/Sub reader to subscribe
a student's channel when the first device connects and to unsubscribe when the last one
leaves, and it is the reader's listener (:class:`.pubsub.listener.PubSubListener`). Fan-out
is synchronous: each event's WebSocket frame is built once for the process and the same
bytes are written to every session of the student (or queued on the ones not reading), so
the reader never waits on a socket. Frames for one socket from one read of the Pub/Sub
connection go out in one write (:class:`.ws.WriteBatch`), flushed when the read ends.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable

from notify.keys import Keys
from notify.protocol import CloseCode, event_id_of, text_frame

from .metrics import GatewayMetrics
from .pubsub.reader import Reader
from .session import Session
from .ws import WriteBatch

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
        keys: Keys,
        batch: WriteBatch,
        max_per_user: int,
        on_change: Callable[[str], None],
        metrics: GatewayMetrics,
    ) -> None:
        self._reader = reader
        self._keys = keys
        self._batch = batch
        self._max_per_user = max_per_user
        # Told which student's connection count changed (presence).
        self._on_change = on_change
        self._users: dict[str, set[Session]] = {}
        self._count = 0
        self._fanout = metrics.fanout
        self._reconnects = metrics.pubsub_reconnects

    @property
    def connection_count(self) -> int:
        return self._count

    def connections(self, user: str) -> int:
        """The student's devices here (presence): an operator watching is not one."""
        return sum(not session.watch for session in self._users.get(user, ()))

    async def join(self, session: Session) -> None:
        """Register ``session``; returns once its student's channel is subscribed."""
        sessions = self._users.setdefault(session.user, set())
        if len(sessions) >= self._max_per_user:
            raise JoinRefused(CloseCode.TOO_MANY_CONNECTIONS, "too many connections")
        sessions.add(session)
        self._count += 1
        self._on_change(session.user)
        try:
            async with asyncio.timeout(SUBSCRIBE_TIMEOUT):
                await self._reader.subscribe(self._keys.channel(session.user))
        except TimeoutError:
            self.leave(session)
            raise JoinRefused(CloseCode.TRY_AGAIN_LATER, "subscription unavailable") from None
        except BaseException:
            self.leave(session)  # cancelled (shutdown): do not stay registered
            raise

    def leave(self, session: Session) -> None:
        sessions = self._users.get(session.user)
        if sessions is None or session not in sessions:
            return
        sessions.discard(session)
        self._count -= 1
        self._on_change(session.user)
        if not sessions:
            del self._users[session.user]
            self._reader.unsubscribe(self._keys.channel(session.user))

    # The reader's listener

    def message(self, channel: bytes, frame: bytes) -> None:
        user = self._keys.user_of_channel(channel)
        sessions = self._users.get(user) if user is not None else None
        if not sessions:
            return
        self._batch.begin()
        event_id = event_id_of(frame)
        try:
            frame.decode()
        except UnicodeDecodeError:
            # The publish function writes UTF-8; a text frame of anything else published on
            # the channel by hand would make clients fail the connection (1007).
            frame = frame.decode(errors="replace").encode()
        wire = text_frame(frame)
        size = len(wire)
        for session in sessions:
            session.deliver(event_id, wire, size)
        fanout = self._fanout
        fanout.pushed["live"] += len(sessions)
        fanout.bytes += size * len(sessions)
        published_ms = _ts(frame)
        if published_ms is not None:
            fanout.observe_latency(max(0.0, time.time() - published_ms / 1000))

    def flush(self) -> None:
        self._batch.end()

    def hold(self, channels: Iterable[str]) -> None:
        """These channels lost their subscription: frames published from now on are unseen."""
        for user in self._served(channels):
            for session in self._users[user]:
                session.hold()

    def catch_up(self, channels: Iterable[str]) -> None:
        """These channels are subscribed again: fill their sessions' gaps from history.

        Redis may have restarted and lost presence too, so their counts are rewritten.
        """
        for user in self._served(channels):
            self._on_change(user)
            for session in self._users[user]:
                session.catch_up()

    def reconnected(self) -> None:
        self._reconnects.inc()

    def _served(self, channels: Iterable[str]) -> list[str]:
        users = (self._keys.user_of_channel(channel.encode()) for channel in channels)
        return [user for user in users if user is not None and user in self._users]


def _ts(frame: bytes) -> int | None:
    """The publish time an event frame ends with (``"ts":<ms>}``), read without parsing it."""
    tail = frame[-24:]
    start = tail.rfind(b'"ts":')
    if start < 0 or not tail.endswith(b"}"):
        return None
    digits = tail[start + 5 : -1]
    return int(digits) if digits.isdigit() else None
