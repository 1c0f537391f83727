"""One student's WebSocket session: its position in the student's history, and delivery.

The Pub/Sub reader hands frames to :meth:`Session.deliver`, which never awaits: it writes
the frame to the socket, or queues it there while the client is not reading. A client that
cannot keep up overflows its byte budget and is closed (it resumes from history later), so
one slow phone never delays anyone else. This module decides what to send and in which
order; :mod:`.ws` does the I/O, and the history is read through what the session is given.

Frames replayed from history count against that limit too. A replay that cannot fit into
it is answered with a resync instead ("too far behind"): closing the client would not help,
since the next resume would read the same replay again.

Delivery is exact because the session keeps the id of the last event it queued and judges
every live frame against it with one rule (:func:`notify.protocol.classify`): in order, it
goes out; a duplicate from the seam between history and live is dropped; a gap is filled
from history before anything newer goes out. The phases:

- STARTING: the welcome and the first history read; live frames are held meanwhile.
- LIVE: frames go out as they come, judged one by one.
- HOLDING: the Pub/Sub subscription was lost; frames are held until it is back.
- CATCHING_UP: a history read fills a gap; frames are held meanwhile, then released in
  order (which may reveal another gap, and another read).
- CLOSED: the socket is closing; nothing more is sent.
"""

from __future__ import annotations

import asyncio
import logging
from enum import Enum
from typing import Protocol

from notify import protocol
from notify.protocol import DUPLICATE, GAP, CloseCode, EventId, classify, text_frame
from notify.redis_client import UNAVAILABLE

from .history import Replay
from .metrics import GatewayMetrics

log = logging.getLogger(__name__)


class Phase(Enum):
    STARTING = "starting"
    LIVE = "live"
    HOLDING = "holding"
    CATCHING_UP = "catching up"
    CLOSED = "closed"


STARTING, LIVE, HOLDING, CATCHING_UP, CLOSED = Phase


class Sink(Protocol):
    """Where a session's frames go: the WebSocket (:class:`.ws.Socket`)."""

    @property
    def charged(self) -> int:
        """Bytes of live frames queued and not yet written."""

    def send(self, frame: bytes, charge: int, limit: int) -> bool:
        """Write or queue ``frame``; False (nothing queued) if it would pass ``limit``."""

    def close(self, code: CloseCode, reason: str = "") -> None: ...


class History(Protocol):
    """The student's history, as :class:`.history.HistoryReader` reads it."""

    async def after(self, user: str, position: EventId | None) -> Replay:
        """The events after ``position``, or why not; None: the current position only."""


Held = tuple[EventId | None, bytes, int]


class Session:
    def __init__(
        self,
        sink: Sink,
        user: str,
        history: History,
        max_queue_bytes: int,
        metrics: GatewayMetrics,
        watch: bool = False,
    ):
        self.user = user
        # An operator watching: served like a device, but not one of the student's.
        self.watch = watch
        self._sink = sink
        self._history = history
        self._max_queue_bytes = max_queue_bytes
        self._metrics = metrics
        self.phase = STARTING
        # The last event queued (or the position a welcome or resync handed out); set by
        # start() before anything is judged against it.
        self._last = EventId("", 0)
        # Live frames held while not LIVE; their bytes count against max_queue_bytes like
        # queued ones.
        self._held: list[Held] = []
        self._held_bytes = 0
        # A catch-up was asked for while history was being read: read again before live.
        self._again = False
        self._reading: asyncio.Task[None] | None = None
        self.expiry: asyncio.TimerHandle | None = None

    @property
    def closing(self) -> bool:
        return self.phase is CLOSED

    async def start(self, since: str | None) -> None:
        """Queue the welcome, then whatever the client missed (or a resync), then go live.

        The hub has already subscribed this student's channel, so every event published
        from here on is held; the history read below covers everything before.
        """
        if since is None:
            head = (await self._history.after(self.user, None)).last_id
            self._last = head
            self.send(protocol.welcome(self.user, head, recovered=False))
        else:
            position = protocol.parse_event_id(since)
            if position is not None:
                replay = await self._history.after(self.user, position)
            else:
                # Also "0", which older clients stored for an empty history: it does not say
                # which incarnation was empty, so only a resync is safe.
                head = (await self._history.after(self.user, None)).last_id
                replay = Replay([], head, "malformed id")
            replay = self._bounded(replay)
            recovered = replay.resync_reason is None
            self._metrics.resumes.labels("recovered" if recovered else "resync").inc()
            self.send(protocol.welcome(self.user, replay.last_id, recovered=recovered))
            self._apply(replay)
        if self.phase is CLOSED:
            return
        if self._again:
            self._read_again()
        else:
            self._release_held()

    def deliver(self, event_id: EventId | None, frame: bytes, size: int) -> None:
        """Send one live frame (already WebSocket-framed) exactly once and in order."""
        phase = self.phase
        if phase is not LIVE:
            if phase is not CLOSED:
                self._hold(event_id, frame, size)
            return
        if event_id is not None:
            order = classify(self._last, event_id)
            if order is DUPLICATE:
                return
            if order is GAP:
                self.hold()
                self._hold(event_id, frame, size)
                self.catch_up()
                return
            self._last = event_id
        self._enqueue(frame, size)

    def send(self, message: str) -> None:
        """Send a control message (welcome, resync, pong)."""
        frame = text_frame(message.encode())
        self._enqueue(frame, len(frame))

    def hold(self) -> None:
        """Stop delivering live frames: the Pub/Sub connection was lost, so they may have holes."""
        if self.phase is LIVE:
            self.phase = HOLDING
            self._held, self._held_bytes = [], 0

    def catch_up(self) -> None:
        """Fill a gap from history: after a Pub/Sub outage, or a hole seen in live frames."""
        if self.phase is CLOSED:
            return
        self._again = True
        self.hold()
        # STARTING reads again itself; CATCHING_UP is reading and will read again.
        if self.phase is HOLDING:
            self._read_again()

    def _read_again(self) -> None:
        self.phase = CATCHING_UP
        if self._reading is None:
            self._reading = asyncio.create_task(self._catch_up())

    async def _catch_up(self) -> None:
        try:
            while self._again:
                self._again = False
                replay = await self._history.after(self.user, self._last)
                if self.phase is CLOSED:
                    return
                self._apply(self._bounded(replay))
                if not self._again:
                    # Releasing the held frames may reveal another hole, which asks again.
                    self._release_held()
        except UNAVAILABLE as exc:
            log.warning("catch-up failed for a connection, closing it: %s", exc)
            self.close(CloseCode.TRY_AGAIN_LATER)
        except Exception:
            # Never leave the session held (open, silent): the client must reconnect.
            log.exception("catch-up failed for a connection, closing it")
            self.close(CloseCode.TRY_AGAIN_LATER)
        finally:
            self._reading = None

    def _hold(self, event_id: EventId | None, frame: bytes, size: int) -> None:
        if self._sink.charged + self._held_bytes + size > self._max_queue_bytes:
            self.close(CloseCode.SLOW_CONSUMER)
            return
        self._held.append((event_id, frame, size))
        self._held_bytes += size

    def _bounded(self, replay: Replay) -> Replay:
        """``replay``, or a resync if its frames cannot fit into the send budget.

        Replayed frames count against the budget like live ones. A replay larger than the
        budget would close the client, and then again on every resume: the client is
        better served reloading its stores.
        """
        size = sum(len(frame) for _id, frame in replay.frames)
        if size > self._max_queue_bytes - self._sink.charged:
            return Replay([], replay.last_id, "too far behind")
        return replay

    def _apply(self, replay: Replay) -> None:
        # The read was one transaction: the frames end exactly at last_id.
        self._last = replay.last_id
        if replay.resync_reason is not None:
            self.send(protocol.resync(replay.resync_reason, replay.last_id))
            return
        if replay.frames:
            # One write for the whole replay instead of one per event.
            frames = b"".join(text_frame(frame) for _id, frame in replay.frames)
            self._enqueue(frames, len(frames))
        self._metrics.fanout.pushed["replay"] += len(replay.frames)

    def _release_held(self) -> None:
        """Go live with the frames held meanwhile, in order."""
        held, self._held, self._held_bytes = self._held, [], 0
        self.phase = LIVE
        # Only frames of the incarnation just read can follow it; the others are dropped.
        # Older ones were covered by the resync that ended it (replaying them would look
        # like a hole forever); a newer one means the history changed during the read.
        # Either way one more read settles it, delivering what is new or saying resync,
        # instead of waiting for the next event to reveal the hole.
        epoch = self._last.epoch
        kept = [h for h in held if h[0] is None or h[0].epoch == epoch]
        if len(kept) < len(held):
            self.catch_up()
            for item in kept:
                self._hold(*item)
            return
        for i, (event_id, frame, size) in enumerate(held):
            self.deliver(event_id, frame, size)
            if self.phase is not LIVE:
                # A gap reopened the hold: keep the rest, in order, for after the catch-up.
                for rest in held[i + 1 :]:
                    self._hold(*rest)
                return

    def _enqueue(self, frame: bytes, charge: int) -> None:
        if self.phase is CLOSED:
            return
        if not self._sink.send(frame, charge, self._max_queue_bytes):
            self.close(CloseCode.SLOW_CONSUMER)

    def close(self, code: CloseCode, reason: str = "") -> None:
        """Close the socket; frames still queued are dropped (history has them)."""
        if self.phase is CLOSED:
            return
        if code == CloseCode.SLOW_CONSUMER:
            self._metrics.slow_closes.inc()
        self.phase = CLOSED
        self._held, self._held_bytes = [], 0
        self._sink.close(code, reason)

    def stop(self) -> None:
        """The socket is gone: no more catch-ups or expiry for it."""
        self.phase = CLOSED
        if self.expiry is not None:
            self.expiry.cancel()
        if self._reading is not None:
            self._reading.cancel()
