from __future__ import annotations

import orjson
import pytest

from bridge.envelope import EnvelopeError, parse


def test_canonical_envelope() -> None:
    event = parse(
        orjson.dumps(
            {
                "eventId": "e1",
                "eventType": "PURCHASE_CREATED",
                "occurredAt": "2026-01-07T22:31:20.393Z",
                "data": {"studentId": "s1"},
            }
        )
    )
    assert event.event_id == "e1"
    assert event.event_type == "PURCHASE_CREATED"
    assert event.occurred_at is not None
    assert event.occurred_at.year == 2026
    assert event.data == {"studentId": "s1"}


def test_aliases() -> None:
    event = parse(
        b'{"eventId":"e1","type":"X","timestamp":"2026-01-07T22:31:20Z","payload":{"a":1}}'
    )
    assert (event.event_type, event.data) == ("X", {"a": 1})
    assert event.occurred_at is not None


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (None, "no value"),
        (b"not json", "not JSON"),
        (b"[1]", "not a JSON object"),
        (b'{"eventType":"X"}', "eventId is missing"),
        (b'{"eventId":"e"}', "eventType is missing"),
        (b'{"eventId":"","eventType":"X"}', "eventId must be"),
        (b'{"eventId":"e","eventType":"X","data":[1]}', "data must be"),
        (b'{"eventId":"e","eventType":"X","occurredAt":"yesterday"}', "ISO-8601"),
    ],
)
def test_malformed_envelopes_say_why(raw: bytes | None, reason: str) -> None:
    with pytest.raises(EnvelopeError, match=reason):
        parse(raw)
