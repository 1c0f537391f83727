"""What the HTTP API accepts, as pure functions: bodies in, validated values or ApiError out.

Every error names the field at fault (``notifications[3].event``) so that a publisher can
fix its request without reading server logs. Unknown fields are refused too: a typo such
as ``userId`` for ``user_id`` must not be silently ignored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from notify import names
from notify.publish import Notification

MAX_BODY_BYTES = 256 * 1024
MAX_DATA_BYTES = 64 * 1024
MAX_BATCH = 1000
MAX_KEY_LENGTH = 200
MAX_REASON_LENGTH = 500
DEFAULT_STORES = ("home", "learning")
# A watch token lets an operator's console read a student's live events. Short-lived, so
# a copied one is of little use; the console asks for another when it expires (4001).
WATCH_TOKEN_TTL = 600


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, "field": self.field}}


def parse_json(raw: bytes) -> dict[str, Any]:
    if len(raw) > MAX_BODY_BYTES:
        raise ApiError(413, "too_large", f"the body is over {MAX_BODY_BYTES} bytes")
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, "malformed_json", f"the body is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ApiError(422, "invalid", "the body must be a JSON object")
    return doc


def _only(doc: dict[str, Any], allowed: set[str], prefix: str) -> None:
    for name in doc:
        if name not in allowed:
            raise ApiError(422, "unknown_field", f"unknown field {name!r}", prefix + name)


def _required_str(doc: dict[str, Any], name: str, prefix: str) -> str:
    if name not in doc:
        raise ApiError(422, "missing", f"{name} is required", prefix + name)
    value = doc[name]
    if not isinstance(value, str):
        raise ApiError(422, "invalid", f"{name} must be a string", prefix + name)
    return value


def _user(doc: dict[str, Any], name: str, prefix: str) -> str:
    value = _required_str(doc, name, prefix)
    if not names.valid_id(value):
        raise ApiError(
            422, "invalid", f"not a valid user id ({names.shape(names.ID)})", prefix + name
        )
    return value


def _event(doc: dict[str, Any], name: str, prefix: str, default: str | None = None) -> str:
    if default is not None and name not in doc:
        return default
    value = _required_str(doc, name, prefix)
    if not names.EVENT_NAME.match(value):
        raise ApiError(
            422, "invalid", f"event names are {names.shape(names.EVENT_NAME)}", prefix + name
        )
    return value


def _stores(
    doc: dict[str, Any], name: str, prefix: str, default: tuple[str, ...]
) -> tuple[str, ...]:
    value = doc.get(name, list(default))
    if not isinstance(value, list) or not all(
        isinstance(s, str) and names.STORE_NAME.match(s) for s in value
    ):
        raise ApiError(
            422,
            "invalid",
            f"a list of store names {names.shape(names.STORE_NAME)}",
            prefix + name,
        )
    return tuple(value)


def _optional_str(doc: dict[str, Any], name: str, prefix: str, limit: int) -> str | None:
    value = doc.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or not 0 < len(value) <= limit:
        raise ApiError(422, "invalid", f"a string of 1 to {limit} characters", prefix + name)
    return value


def _notification(doc: Any, prefix: str) -> Notification:
    if not isinstance(doc, dict):
        raise ApiError(422, "invalid", "a notification is a JSON object", prefix.rstrip("."))
    _only(doc, {"user_id", "event", "data", "invalidate", "idempotency_key"}, prefix)
    user = _user(doc, "user_id", prefix)
    event = _event(doc, "event", prefix)
    data = doc.get("data", {})
    if not isinstance(data, dict):
        raise ApiError(422, "invalid", "data must be a JSON object", prefix + "data")
    try:
        encoded = orjson.dumps(data)
    except orjson.JSONEncodeError:
        raise ApiError(
            422, "invalid", "data is nested too deeply to encode", prefix + "data"
        ) from None
    if len(encoded) > MAX_DATA_BYTES:
        raise ApiError(413, "too_large", f"data is over {MAX_DATA_BYTES} bytes", prefix + "data")
    invalidate = _stores(doc, "invalidate", prefix, ())
    key = _optional_str(doc, "idempotency_key", prefix, MAX_KEY_LENGTH)
    return Notification(user, event, data, invalidate, None if key is None else f"idem:{key}")


def publish_request(doc: dict[str, Any]) -> list[Notification]:
    """One notification, or ``{"notifications": [...]}``; all valid, or ApiError."""
    if "notifications" not in doc:
        return [_notification(doc, "")]
    _only(doc, {"notifications"}, "")
    batch = doc["notifications"]
    if not isinstance(batch, list) or not 0 < len(batch) <= MAX_BATCH:
        raise ApiError(
            422, "invalid", f"notifications must be a list of 1 to {MAX_BATCH}", "notifications"
        )
    return [_notification(item, f"notifications[{i}].") for i, item in enumerate(batch)]


@dataclass(frozen=True, slots=True)
class TriggerUpdate:
    student_id: str
    course_id: str | None
    reason: str | None
    event: str
    invalidate: tuple[str, ...]


def trigger_update_request(doc: dict[str, Any]) -> TriggerUpdate:
    _only(doc, {"student_id", "course_id", "reason", "event", "invalidate"}, "")
    course = _optional_str(doc, "course_id", "", 128)
    if course is not None and not names.valid_id(course):
        raise ApiError(
            422, "invalid", f"not a valid course id ({names.shape(names.ID)})", "course_id"
        )
    return TriggerUpdate(
        student_id=_user(doc, "student_id", ""),
        course_id=course,
        reason=_optional_str(doc, "reason", "", MAX_REASON_LENGTH),
        event=_event(doc, "event", "", default="STORE_INVALIDATE"),
        invalidate=_stores(doc, "invalidate", "", DEFAULT_STORES),
    )


def limit(raw: str | None, default: int, maximum: int) -> int:
    if raw is None:
        return default
    if not (raw.isascii() and raw.isdigit()) or not 0 < int(raw) <= maximum:
        raise ApiError(422, "invalid", f"limit must be an integer from 1 to {maximum}", "limit")
    return int(raw)
