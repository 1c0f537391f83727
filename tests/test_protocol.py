from __future__ import annotations

import orjson
import pytest

from notify import protocol
from notify.protocol import CloseCode, EventId, ProtocolViolation


def test_event_ids_round_trip() -> None:
    parsed = protocol.parse_event_id("a1b2c3d4-42")
    assert parsed == EventId("a1b2c3d4", 42)
    assert str(parsed) == "a1b2c3d4-42"


@pytest.mark.parametrize(
    ("last", "event", "order"),
    [
        (EventId("e", 0), EventId("e", 1), protocol.IN_ORDER),  # a history's first event
        (EventId("e", 0), EventId("e", 2), protocol.GAP),
        (EventId("e", 42), EventId("e", 43), protocol.IN_ORDER),
        (EventId("e", 42), EventId("e", 42), protocol.DUPLICATE),
        (EventId("e", 42), EventId("e", 7), protocol.DUPLICATE),
        (EventId("e", 42), EventId("e", 44), protocol.GAP),
        # Another incarnation is a gap even at seq 1: only the history can say resync.
        (EventId("e", 42), EventId("f", 1), protocol.GAP),
        (EventId("e", 42), EventId("f", 43), protocol.GAP),
    ],
)
def test_the_ordering_rule(last: EventId, event: EventId, order: protocol.Order) -> None:
    assert protocol.classify(last, event) is order


@pytest.mark.parametrize("raw", ["", "0", "42", "e-00", "e-01", "E-1", "e--1", "e-1-2", "e-1x"])
def test_malformed_event_ids(raw: str) -> None:
    assert protocol.parse_event_id(raw) is None


def test_event_frame_id_is_read_without_parsing_json() -> None:
    body = protocol.event_body("E", {"a": "é"}, ["home"], 1)
    frame = b'{"type":"event","id":"ab-7",' + body
    assert orjson.loads(frame) == {
        "type": "event",
        "id": "ab-7",
        "event": "E",
        "data": {"a": "é"},
        "invalidate": ["home"],
        "ts": 1,
    }
    assert protocol.event_id_of(frame) == EventId("ab", 7)
    assert protocol.event_id_of(b'{"type":"pong"}') is None


def test_client_frames() -> None:
    assert isinstance(protocol.parse_client_frame('{"type":"ping"}'), protocol.Ping)
    assert isinstance(protocol.parse_client_frame('{"type":"future"}'), protocol.Ignored)
    with pytest.raises(ProtocolViolation) as bad:
        protocol.parse_client_frame("nope")
    assert bad.value.code == CloseCode.POLICY_VIOLATION
    with pytest.raises(ProtocolViolation) as big:
        protocol.parse_client_frame(b"{" + b" " * 5000 + b"}")
    assert big.value.code == CloseCode.TOO_BIG


def test_redaction() -> None:
    from notify.logs import redact

    assert redact('"WebSocket /ws?token=abc.def.ghi&since=x-1"') == (
        '"WebSocket /ws?token=[redacted]&since=x-1"'
    )
    assert redact("Authorization: Bearer abc.def") == "Authorization: [redacted]"
    # Redacted as the gateway parses them, not by spelling (review item 10).
    assert redact("GET /ws?%74oken=abc.def&since=x-1 HTTP/1.1") == (
        "GET /ws?token=[redacted]&since=x-1 HTTP/1.1"
    )
    assert redact("< authorization: BEARER abc.def") == "< authorization: [redacted]"
    assert redact("scheme bEaReR abc.def") == "scheme bEaReR [redacted]"
    assert redact("GET /api/history/s1?limit=5") == "GET /api/history/s1?limit=5"
