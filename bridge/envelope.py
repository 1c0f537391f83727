"""The Kafka envelope the bridge accepts, parsed as a pure function.

Producers on the platform are not uniform (the incident reports mention several workers),
so a few aliases are accepted: ``type`` for ``eventType``, ``timestamp`` for ``occurredAt``
and ``payload`` for ``data``. Anything else that is wrong raises :class:`EnvelopeError`
whose message becomes the dead-letter reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson

MAX_ID_LENGTH = 200


class EnvelopeError(Exception):
    """Why a message cannot be handled; recorded as the dead letter's reason."""


# Not frozen: one is built per event read, and a frozen dataclass costs twice as much to
# build. Nothing changes one once built.
@dataclass(slots=True)
class Envelope:
    event_id: str
    event_type: str
    occurred_at: datetime | None
    data: dict[str, Any]


def parse(raw: bytes | None) -> Envelope:
    if raw is None:
        raise EnvelopeError("message has no value")
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise EnvelopeError(f"value is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise EnvelopeError("value is not a JSON object")
    event_id = _text(doc, "eventId")
    event_type = _text(doc, "eventType", "type")
    data = _field(doc, "data", "payload")
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise EnvelopeError("data must be a JSON object")
    return Envelope(event_id, event_type, _time(doc), data)


def _field(doc: dict[str, Any], name: str, alias: str | None = None) -> Any:
    if name in doc:
        return doc[name]
    return doc.get(alias) if alias is not None else None


def _text(doc: dict[str, Any], name: str, alias: str | None = None) -> str:
    value = _field(doc, name, alias)
    if value is None:
        raise EnvelopeError(f"{name} is missing")
    if not isinstance(value, str) or not value.strip() or len(value) > MAX_ID_LENGTH:
        raise EnvelopeError(
            f"{name} must be a non-empty string of at most {MAX_ID_LENGTH} characters"
        )
    return value


def _time(doc: dict[str, Any]) -> datetime | None:
    value = _field(doc, "occurredAt", "timestamp")
    if value is None:
        return None
    if not isinstance(value, str):
        raise EnvelopeError("occurredAt must be an ISO-8601 string")
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        raise EnvelopeError(f"occurredAt is not ISO-8601: {value[:40]!r}") from None
