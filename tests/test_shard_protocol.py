"""The shard's subscription rules, without a server: RESP bytes in, events out."""

from __future__ import annotations

import pytest

from gateway.pubsub.shard import (
    Confirmed,
    Displaced,
    Event,
    Message,
    ProbeSeen,
    Refused,
    ShardProtocol,
)

PROBE = "notify:probe:p:{0}"
A, B = "{u:a}:chan", "{u:b}:chan"


def push(*items: str | bytes) -> bytes:
    """A RESP array of bulk strings, as Redis sends replies and messages."""
    out = [f"*{len(items)}\r\n".encode()]
    for item in items:
        data = item.encode() if isinstance(item, str) else item
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def ack(kind: str, channel: str, count: int = 1) -> bytes:
    """A (s)subscribe or (s)unsubscribe reply: [kind, channel, count]."""
    return b"*3\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n:%d\r\n" % (
        len(kind),
        kind.encode(),
        len(channel),
        channel.encode(),
        count,
    )


def connected(*wanted: str) -> ShardProtocol:
    """A protocol on a fresh connection whose restore Redis confirmed."""
    shard = ShardProtocol(PROBE)
    shard.wanted.update(wanted)
    shard.connect()
    replies = [ack("ssubscribe", PROBE), *(ack("ssubscribe", c) for c in sorted(wanted))]
    shard.receive_data(b"".join(replies))
    shard.data_to_send()
    assert shard.unanswered == 0
    return shard


def test_a_connection_subscribes_the_probe_then_every_wanted_channel_one_per_command() -> None:
    shard = ShardProtocol(PROBE)
    shard.wanted.update({B, A})
    shard.connect(["user", "secret"])
    assert shard.data_to_send() == b"".join(
        [
            b"*3\r\n$4\r\nAUTH\r\n$4\r\nuser\r\n$6\r\nsecret\r\n",
            push("SSUBSCRIBE", PROBE),
            push("SSUBSCRIBE", A),
            push("SSUBSCRIBE", B),
        ]
    )
    assert shard.unanswered == 4
    events = shard.receive_data(
        b"+OK\r\n" + ack("ssubscribe", PROBE) + ack("ssubscribe", A) + ack("ssubscribe", B)
    )
    # The probe is not a student's channel: its confirmation is no event.
    assert events == [Confirmed(A, catch_up=False), Confirmed(B, catch_up=False)]
    assert shard.unanswered == 0


def test_nothing_is_sent_while_disconnected_and_everything_wanted_on_connect() -> None:
    shard = ShardProtocol(PROBE)
    assert shard.subscribe(A) is False
    assert shard.data_to_send() == b""
    shard.connect()
    assert push("SSUBSCRIBE", A) in shard.data_to_send()


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (push("smessage", A, b'{"type":"event"}'), [Message(A.encode(), b'{"type":"event"}')]),
        (push("smessage", PROBE, b""), [ProbeSeen()]),
        # Displaced: the node no longer serves the slot, unasked.
        (ack("sunsubscribe", A, 0), [Displaced(A)]),
        (ack("sunsubscribe", PROBE, 0), [Displaced(PROBE)]),
        # A channel nobody wants any more, unsubscribed by the node: nothing to do.
        (ack("sunsubscribe", "{u:gone}:chan", 0), []),
        # Several replies in one read, in order.
        (
            push("smessage", A, b"1") + push("smessage", B, b"2"),
            [Message(A.encode(), b"1"), Message(B.encode(), b"2")],
        ),
    ],
)
def test_one_read_of_a_live_connection(data: bytes, expected: list[Event]) -> None:
    assert connected(A, B).receive_data(data) == expected


@pytest.mark.parametrize(
    "error", ["MOVED 1234 10.0.0.2:7001", "ASK 1234 10.0.0.2:7001", "TRYAGAIN x", "CLUSTERDOWN x"]
)
def test_an_ssubscribe_answered_with_a_relocation_displaces_its_channel(error: str) -> None:
    shard = connected()
    assert shard.subscribe(A) is False
    shard.data_to_send()
    assert shard.receive_data(f"-{error}\r\n".encode()) == [Displaced(A)]
    assert A not in shard.wanted
    # Released here: the SUNSUBSCRIBE goes out, and the reader routes the channel again.
    assert shard.data_to_send() == push("SUNSUBSCRIBE", A)


def test_a_relocated_sunsubscribe_is_no_event() -> None:
    shard = connected(A)
    shard.unsubscribe(A)
    assert shard.receive_data(b"-MOVED 1234 10.0.0.2:7001\r\n") == []
    assert shard.unanswered == 0


def test_the_probes_relocation_displaces_the_probe() -> None:
    shard = connected()
    shard.move_probe("notify:probe:p:{7}")
    shard.data_to_send()
    events = shard.receive_data(ack("sunsubscribe", PROBE, 0) + b"-MOVED 1 10.0.0.2:7001\r\n")
    assert events == [Displaced("notify:probe:p:{7}")]


def test_any_other_error_refuses_the_connection_and_ends_the_read() -> None:
    shard = connected()
    shard.subscribe(A)
    events = shard.receive_data(b"-ERR unknown command\r\n" + push("smessage", B, b"x"))
    assert events == [Refused("redis refused SSUBSCRIBE {u:a}:chan: ERR unknown command")]


def test_a_refused_auth_refuses_the_connection() -> None:
    shard = ShardProtocol(PROBE)
    shard.connect(["wrong"])
    [event] = shard.receive_data(b"-WRONGPASS invalid username-password pair\r\n")
    assert isinstance(event, Refused)
    assert "WRONGPASS" in event.reason


def test_replies_belong_to_the_oldest_command() -> None:
    shard = connected()
    shard.subscribe(A)
    shard.subscribe(B)
    events = shard.receive_data(b"-MOVED 1 10.0.0.2:7001\r\n" + ack("ssubscribe", B))
    assert events == [Displaced(A), Confirmed(B, catch_up=False)]


def test_an_old_reply_does_not_vouch_for_a_channel_resubscribed_since() -> None:
    shard = connected()
    shard.subscribe(A)
    shard.unsubscribe(A)
    shard.subscribe(A)
    assert shard.receive_data(ack("ssubscribe", A)) == []  # an SUNSUBSCRIBE is still ahead
    assert shard.receive_data(ack("sunsubscribe", A, 0)) == []  # asked for: not displaced
    assert shard.receive_data(ack("ssubscribe", A)) == [Confirmed(A, catch_up=False)]
    assert shard.subscribe(A) is True  # confirmed: nothing to send, nothing to wait for
    assert shard.data_to_send().count(b"SSUBSCRIBE") == 2


def test_a_reply_split_over_reads_is_one_event() -> None:
    shard = connected(A)
    data = push("smessage", A, b"x" * 100)
    assert shard.receive_data(data[:7]) == []
    assert shard.receive_data(data[7:60]) == []
    assert shard.receive_data(data[60:]) == [Message(A.encode(), b"x" * 100)]


def test_an_unreadable_stream_refuses_the_connection() -> None:
    [event] = connected().receive_data(b"!not resp\r\n")
    assert isinstance(event, Refused)


def test_a_dropped_live_connection_is_a_gap_and_the_next_one_catches_up() -> None:
    shard = connected(A, B)
    assert shard.disconnect(was_live=True) is True
    assert shard.connect() is True  # follows a gap
    events = shard.receive_data(
        ack("ssubscribe", PROBE) + ack("ssubscribe", A) + ack("ssubscribe", B)
    )
    assert events == [Confirmed(A, catch_up=True), Confirmed(B, catch_up=True)]
    # Once caught up, a later drop before anything is confirmed is a gap again (it was live).
    assert shard.disconnect(was_live=True) is True


def test_a_connection_that_never_subscribed_anything_is_no_gap() -> None:
    shard = ShardProtocol(PROBE)
    shard.wanted.add(A)
    shard.connect()
    assert shard.disconnect(was_live=False) is False
    assert shard.connect() is False


def test_a_drop_while_still_subscribing_is_a_gap_once_a_channel_was_confirmed() -> None:
    shard = ShardProtocol(PROBE)
    shard.wanted.update({A, B})
    shard.connect()
    shard.receive_data(ack("ssubscribe", PROBE) + ack("ssubscribe", A))  # B still unanswered
    assert shard.disconnect(was_live=False) is True


def test_an_adopted_channel_is_confirmed_with_catch_up() -> None:
    shard = connected()
    shard.adopt(A)
    assert shard.data_to_send() == push("SSUBSCRIBE", A)
    assert shard.receive_data(ack("ssubscribe", A)) == [Confirmed(A, catch_up=True)]


def test_a_channel_unsubscribed_before_its_confirmation_is_not_confirmed() -> None:
    shard = connected()
    shard.subscribe(A)
    shard.unsubscribe(A)
    assert shard.receive_data(ack("ssubscribe", A) + ack("sunsubscribe", A, 0)) == []
