"""One student's WebSocket: its position in the student's history and its send queue.

The Pub/Sub reader hands frames to :meth:`Connection.deliver`, which never awaits: it writes
the frame to the socket, or queues it there while the client is not reading. A client that
cannot keep up overflows its byte budget and is closed (it resumes from history later), so
one slow phone never delays anyone else. This module decides what to send and in which
order; :mod:`.socket` does the I/O.

Frames replayed from history are queued without counting against that limit: they are
bounded by the history size already, and a client resuming a long backlog is catching up,
not falling behind.

The connection also keeps the id of the last event it queued. That position is what makes
delivery exact: a live frame at or before it is a duplicate from the seam between history
and live, and a live frame that skips past it reveals a gap, which is filled from history
before anything newer goes out.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from .. import history, protocol
from ..protocol import CloseCode, EventId
from ..redis_client import UNAVAILABLE, Client
from .metrics import GatewayMetrics
from .socket import text_frame

if TYPE_CHECKING:
    from .socket import Socket

log = logging.getLogger(__name__)


class Connection:
    def __init__(
        self,
        socket: Socket,
        user: str,
        redis: Client,
        max_queue_bytes: int,
        history_reads: asyncio.Semaphore,
        metrics: GatewayMetrics,
    ):
        self.user = user
        self._metrics = metrics
        self._socket = socket
        self._redis = redis
        # Shared by every connection of the process: after a Pub/Sub outage all of them
        # catch up at once, and unbounded that would open a Redis connection each.
        self._history_reads = history_reads
        self._max_queue_bytes = max_queue_bytes
        self._close_code: CloseCode | None = None
        self._last: EventId | None = None
        # Live frames held back while history is being read; None when live. Their bytes
        # count against max_queue_bytes like queued ones.
        self._held: list[tuple[EventId | None, bytes, int]] | None = []
        self._held_bytes = 0
        self._catch_up: asyncio.Task[None] | None = None
        self._catch_up_again = False
        self._started = False
        self.expiry: asyncio.TimerHandle | None = None

    @property
    def closing(self) -> bool:
        return self._close_code is not None

    async def start(self, since: str | None) -> None:
        """Queue the welcome, then whatever the client missed (or a resync), then go live.

        The hub has already subscribed this student's channel, so every event published
        from here on is held in ``_held``; the history read below covers everything before.
        """
        if since is None:
            async with self._history_reads:
                head = await history.current(self._redis, self.user)
            self._last = head
            self.send(protocol.welcome(self.user, head, recovered=False))
        else:
            position = protocol.parse_event_id(since)
            async with self._history_reads:
                if since == protocol.FROM_START or position is not None:
                    replay = await history.after(self._redis, self.user, position)
                else:
                    head = await history.current(self._redis, self.user)
                    replay = history.Replay([], head, "malformed id")
            recovered = replay.resync_reason is None
            self._metrics.resumes.labels("recovered" if recovered else "resync").inc()
            self.send(protocol.welcome(self.user, replay.last_id, recovered=recovered))
            self._apply(replay)
        self._started = True
        if self._catch_up_again:
            self._catch_up = asyncio.create_task(self._catch_up_loop())
        else:
            self._go_live()

    def deliver(self, event_id: EventId | None, frame: bytes, size: int) -> None:
        """Send one live frame (already WebSocket-framed) exactly once and in order."""
        if self._held is not None:
            self._hold(event_id, frame, size)
            return
        if event_id is not None:
            last = self._last
            if last is None:
                in_order = event_id.seq == 1  # a history's first event
            elif event_id.epoch == last.epoch:
                if event_id.seq <= last.seq:
                    return  # already queued from history
                in_order = event_id.seq == last.seq + 1
            else:
                # A new incarnation. The old one may have ended with events this client
                # never got (a failover loses the primary's last writes): only the history
                # can tell, and it answers with a resync.
                in_order = False
            if not in_order:
                self.hold()
                self._hold(event_id, frame, size)
                self.request_catch_up()
                return
            self._last = event_id
        self._enqueue(frame, size)

    def send(self, message: str) -> None:
        """Send a control message (welcome, resync, pong)."""
        frame = text_frame(message.encode())
        self._enqueue(frame, len(frame))

    def hold(self) -> None:
        """Stop delivering live frames: the Pub/Sub connection was lost, so they may have holes."""
        if self._held is None:
            self._held = []
            self._held_bytes = 0

    def _hold(self, event_id: EventId | None, frame: bytes, size: int) -> None:
        assert self._held is not None
        if self._socket.charged + self._held_bytes + size > self._max_queue_bytes:
            self.close(CloseCode.SLOW_CONSUMER)
            return
        self._held.append((event_id, frame, size))
        self._held_bytes += size

    def request_catch_up(self) -> None:
        """Fill a gap from history: after a Pub/Sub outage, or a hole seen in live frames."""
        self._catch_up_again = True
        self.hold()
        if self._catch_up is None and self._started and not self.closing:
            self._catch_up = asyncio.create_task(self._catch_up_loop())

    async def _catch_up_loop(self) -> None:
        try:
            while self._catch_up_again:
                while self._catch_up_again:
                    self._catch_up_again = False
                    async with self._history_reads:
                        replay = await history.after(self._redis, self.user, self._last)
                    self._apply(replay)
                # Releasing the held frames may reveal another hole, which asks again.
                self._go_live()
        except UNAVAILABLE as exc:
            log.warning("catch-up failed for a connection, closing it: %s", exc)
            self.close(CloseCode.TRY_AGAIN_LATER)
        except Exception:
            # Never leave the connection held (open, silent): the client must reconnect.
            log.exception("catch-up failed for a connection, closing it")
            self.close(CloseCode.TRY_AGAIN_LATER)
        finally:
            self._catch_up = None

    def _apply(self, replay: history.Replay) -> None:
        if replay.resync_reason is not None:
            self.send(protocol.resync(replay.resync_reason, replay.last_id))
            self._last = replay.last_id
            return
        if replay.frames:
            # One write for the whole replay instead of one per event.
            self._enqueue(b"".join(text_frame(frame) for _id, frame in replay.frames), 0)
        self._metrics.fanout.pushed["replay"] += len(replay.frames)
        # The read was one transaction: the frames end exactly at last_id.
        self._last = replay.last_id

    def _go_live(self) -> None:
        held, self._held = self._held or [], None
        self._held_bytes = 0
        # Only frames of the incarnation just read can follow it. Older ones were covered by
        # the resync that ended it; replaying them would look like a hole forever. A newer
        # one means the history changed during the read: read again, which delivers it or
        # says resync, instead of waiting for the next event to reveal the hole.
        epoch = None if self._last is None else self._last.epoch
        kept = [h for h in held if h[0] is None or h[0].epoch == epoch]
        if len(kept) < len(held):
            held = kept
            self.request_catch_up()
            self._held = self._held or []
            if self._catch_up is not None:
                # A catch-up is already running (we are inside it): hold the rest for it.
                for item in held:
                    self._hold(*item)
                return
        for i, (event_id, frame, size) in enumerate(held):
            self.deliver(event_id, frame, size)
            if self._held is not None:
                # A gap reopened the hold: keep the rest, in order, for after the catch-up.
                for rest in held[i + 1 :]:
                    self._hold(*rest)
                return

    def _enqueue(self, frame: bytes, charge: int) -> None:
        if self.closing:
            return
        if not self._socket.send(frame, charge, self._max_queue_bytes):
            self.close(CloseCode.SLOW_CONSUMER)

    def close(self, code: CloseCode, reason: str = "") -> None:
        """Close the socket; frames still queued are dropped (history has them)."""
        if self.closing:
            return
        if code == CloseCode.SLOW_CONSUMER:
            self._metrics.slow_closes.inc()
        self._close_code = code
        self._socket.close(code, reason)

    def stop(self) -> None:
        """The socket is gone: no more catch-ups or expiry for it."""
        self._close_code = self._close_code or CloseCode.NORMAL
        if self.expiry is not None:
            self.expiry.cancel()
        if self._catch_up is not None:
            self._catch_up.cancel()
