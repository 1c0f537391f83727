"""Delivery as a state machine, without a server: live frames and history reads in, frames out.

The history is a test double of the interface the session is given (what
:class:`gateway.history.HistoryReader` reads from Redis); the sink records what the socket
would have written.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest

from gateway.history import Replay
from gateway.metrics import GatewayMetrics
from gateway.session import CATCHING_UP, CLOSED, HOLDING, LIVE, STARTING, Session
from notify.protocol import CloseCode, EventId, text_frame

USER = "s1"


def ev(raw: str) -> EventId:
    epoch, seq = raw.split("-")
    return EventId(epoch, int(seq))


def body(raw: str) -> bytes:
    return b'{"type":"event","id":"%s","event":"E"}' % raw.encode()


class Sink:
    """The socket: records what it would have written."""

    def __init__(self) -> None:
        self.data = b""
        self.charged = 0
        # A client that stopped reading, its queue at the limit: live frames overflow.
        self.full = False
        self.closed: CloseCode | None = None

    def send(self, frame: bytes, charge: int, limit: int) -> bool:
        if self.full and charge:
            return False
        self.data += frame
        return True

    def close(self, code: CloseCode, reason: str = "") -> None:
        self.closed = code

    def frames(self) -> list[Any]:
        """What the client read: event ids, or control frames as (type, last_id/reason)."""
        out: list[Any] = []
        data = self.data
        while data:
            length, start = data[1] & 0x7F, 2
            if length == 126:
                length, start = int.from_bytes(data[2:4], "big"), 4
            doc = orjson.loads(data[start : start + length])
            data = data[start + length :]
            if doc["type"] == "event":
                out.append(doc["id"])
            elif doc["type"] == "resync":
                out.append(("resync", doc["last_id"]))
            else:
                out.append((doc["type"], doc["last_id"], doc.get("recovered")))
        return out


class History:
    """Answers each read with the next prepared replay; a read waits while ``gate`` is clear."""

    def __init__(self, head: str, *replays: Replay) -> None:
        self.head = ev(head)
        self.replays = list(replays)
        # Positions read after (the current position's reads are not recorded).
        self.asked: list[EventId] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.fail: Exception | None = None

    async def after(self, user: str, position: EventId | None) -> Replay:
        if position is None:
            await self.gate.wait()
            return Replay([], self.head)
        self.asked.append(position)
        await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        return self.replays.pop(0)


def replay(*ids: str, last: str | None = None, resync: str | None = None) -> Replay:
    frames = [(ev(i), body(i)) for i in ids]
    return Replay(frames, ev(last or ids[-1]), resync)


def session(history: History, sink: Sink | None = None, budget: int = 1 << 20) -> Session:
    return Session(sink or Sink(), USER, history, budget, GatewayMetrics(lambda: 0))


def live(s: Session, raw: str) -> None:
    frame = text_frame(body(raw))
    s.deliver(ev(raw), frame, len(frame))


async def settled() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_in_order_frames_go_out_and_duplicates_are_dropped() -> None:
    sink = Sink()
    s = session(History("e-3"), sink)
    await s.start(None)
    assert s.phase is LIVE
    for raw in ("e-4", "e-4", "e-2", "e-5"):
        live(s, raw)
    assert sink.frames() == [("welcome", "e-3", False), "e-4", "e-5"]


async def test_a_gap_is_filled_from_history_before_anything_newer() -> None:
    sink = Sink()
    history = History("e-3", replay("e-4", "e-5", "e-6"))
    s = session(history, sink)
    await s.start(None)
    history.gate.clear()
    live(s, "e-6")  # e-4 and e-5 never arrived live
    await settled()
    assert s.phase is CATCHING_UP
    live(s, "e-7")  # held during the read
    history.gate.set()
    await settled()
    assert history.asked == [ev("e-3")]
    assert s.phase is LIVE
    assert sink.frames() == [("welcome", "e-3", False), "e-4", "e-5", "e-6", "e-7"]


async def test_frames_that_arrive_while_starting_are_held_then_judged() -> None:
    sink = Sink()
    history = History("e-0", replay("e-1", "e-2"))
    s = session(history, sink)
    history.gate.clear()
    starting = asyncio.create_task(s.start("e-0"))
    await settled()
    assert s.phase is STARTING
    live(s, "e-2")  # also in the history read: the seam's duplicate
    live(s, "e-3")
    history.gate.set()
    await starting
    assert sink.frames() == [("welcome", "e-2", True), "e-1", "e-2", "e-3"]


async def test_a_first_event_is_in_order_for_a_client_that_has_seen_nothing() -> None:
    sink = Sink()
    s = session(History("e-0"), sink)
    await s.start(None)
    live(s, "e-1")
    assert sink.frames() == [("welcome", "e-0", False), "e-1"]


async def test_a_new_epoch_live_is_a_gap_the_history_answers_with_resync() -> None:
    sink = Sink()
    history = History("e-3", replay(last="f-1", resync="history epoch changed"))
    s = session(history, sink)
    await s.start(None)
    live(s, "f-1")
    await settled()
    live(s, "f-2")
    assert sink.frames() == [
        ("welcome", "e-3", False),
        ("resync", "f-1"),
        "f-2",  # f-1 is what the resync's reload covers
    ]


async def test_a_lost_subscription_holds_frames_until_the_catch_up() -> None:
    sink = Sink()
    history = History("e-1", replay("e-2", "e-3"))
    s = session(history, sink)
    await s.start(None)
    s.hold()
    assert s.phase is HOLDING
    live(s, "e-3")  # arrived on a new subscription before the catch-up was asked
    await settled()
    assert history.asked == []  # holding waits for the resubscription
    s.catch_up()
    await settled()
    assert s.phase is LIVE
    assert sink.frames() == [("welcome", "e-1", False), "e-2", "e-3"]


async def test_a_catch_up_asked_during_a_read_reads_again_before_going_live() -> None:
    sink = Sink()
    history = History("e-1", replay("e-2"), replay("e-3"))
    s = session(history, sink)
    await s.start(None)
    history.gate.clear()
    s.hold()
    s.catch_up()
    await settled()
    s.catch_up()  # another outage ended while the first read ran
    history.gate.set()
    await settled()
    assert history.asked == [ev("e-1"), ev("e-2")]
    assert sink.frames() == [("welcome", "e-1", False), "e-2", "e-3"]


async def test_held_frames_of_the_ended_epoch_are_dropped_after_a_resync() -> None:
    sink = Sink()
    history = History("e-1", replay(last="f-2", resync="history epoch changed"), replay(last="f-2"))
    s = session(history, sink)
    await s.start(None)
    history.gate.clear()
    s.hold()
    s.catch_up()
    live(s, "e-2")  # the old incarnation's: covered by the resync
    history.gate.set()
    await settled()
    assert history.asked == [ev("e-1"), ev("f-2")]  # one more read confirms it
    live(s, "f-3")
    assert sink.frames() == [("welcome", "e-1", False), ("resync", "f-2"), "f-3"]


async def test_a_held_frame_of_a_newer_epoch_than_the_read_reads_again() -> None:
    sink = Sink()
    history = History("e-1", replay("e-2"), replay(last="f-1", resync="history epoch changed"))
    s = session(history, sink)
    await s.start(None)
    history.gate.clear()
    s.hold()
    s.catch_up()
    live(s, "f-1")  # the history changed during the read
    history.gate.set()
    await settled()
    assert history.asked == [ev("e-1"), ev("e-2")]
    assert sink.frames() == [("welcome", "e-1", False), "e-2", ("resync", "f-1")]


async def test_a_gap_among_released_frames_keeps_the_rest_in_order() -> None:
    sink = Sink()
    history = History("e-1", replay("e-2"), replay("e-3", "e-4"))
    s = session(history, sink)
    await s.start(None)
    history.gate.clear()
    s.hold()
    s.catch_up()
    for raw in ("e-4", "e-5"):  # e-3 is missing among them
        live(s, raw)
    history.gate.set()
    await settled()
    assert history.asked == [ev("e-1"), ev("e-2")]
    assert sink.frames() == [("welcome", "e-1", False), "e-2", "e-3", "e-4", "e-5"]


@pytest.mark.parametrize(
    ("since", "result", "frames"),
    [
        ("e-2", replay("e-3", "e-4"), [("welcome", "e-4", True), "e-3", "e-4"]),
        ("e-4", replay(last="e-4"), [("welcome", "e-4", True)]),
        (
            "e-1",
            replay(last="e-9", resync="history trimmed"),
            [("welcome", "e-9", False), ("resync", "e-9")],
        ),
        (
            "x-1",
            replay(last="e-9", resync="history epoch changed"),
            [("welcome", "e-9", False), ("resync", "e-9")],
        ),
    ],
)
async def test_resume(since: str, result: Replay, frames: list[Any]) -> None:
    sink = Sink()
    history = History("e-0", result)
    s = session(history, sink)
    await s.start(since)
    assert history.asked == [ev(since)]
    assert sink.frames() == frames


async def test_a_malformed_position_resyncs_from_the_head() -> None:
    sink = Sink()
    s = session(History("e-9"), sink)
    await s.start("garbage")
    assert sink.frames() == [("welcome", "e-9", False), ("resync", "e-9")]


async def test_a_position_without_an_epoch_resyncs_from_the_head() -> None:
    """``0``, which older clients stored for an empty history: which history was empty?"""
    sink = Sink()
    s = session(History("e-9"), sink)
    await s.start("0")
    assert sink.frames() == [("welcome", "e-9", False), ("resync", "e-9")]


async def test_a_replay_larger_than_the_send_budget_is_a_resync() -> None:
    sink = Sink()
    history = History("e-0", replay("e-1", "e-2", "e-3"))
    s = session(history, sink, budget=len(body("e-1")) * 2)
    await s.start("e-0")
    assert sink.frames() == [("welcome", "e-3", False), ("resync", "e-3")]
    live(s, "e-4")
    assert sink.frames()[-1] == "e-4"


async def test_a_client_that_cannot_keep_up_is_closed_4008() -> None:
    sink = Sink()
    s = session(History("e-1"), sink)
    await s.start(None)
    sink.full = True
    live(s, "e-2")
    assert sink.closed == CloseCode.SLOW_CONSUMER
    assert s.phase is CLOSED
    live(s, "e-3")  # nothing more for a closing session
    assert sink.frames() == [("welcome", "e-1", False)]


async def test_held_frames_count_against_the_budget() -> None:
    sink = Sink()
    frame = text_frame(body("e-2"))
    s = session(History("e-1"), sink, budget=len(frame) * 2)
    await s.start(None)
    s.hold()
    for raw in ("e-2", "e-3", "e-4"):
        live(s, raw)
    assert sink.closed == CloseCode.SLOW_CONSUMER


async def test_a_failed_catch_up_closes_1013_rather_than_staying_silent() -> None:
    from redis.exceptions import ConnectionError as RedisConnectionError

    sink = Sink()
    history = History("e-1")
    s = session(history, sink)
    await s.start(None)
    history.fail = RedisConnectionError("gone")
    s.hold()
    s.catch_up()
    await settled()
    assert sink.closed == CloseCode.TRY_AGAIN_LATER
    assert s.phase is CLOSED


async def test_a_stopped_session_reads_nothing_more() -> None:
    history = History("e-1", replay("e-2"))
    s = session(history)
    await s.start(None)
    history.gate.clear()
    s.hold()
    s.catch_up()
    s.stop()
    history.gate.set()
    await settled()
    assert s.phase is CLOSED
