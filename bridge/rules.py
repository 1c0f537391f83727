"""Declarative mapping from Kafka domain events to notifications and cache deletions.

A rule file (TOML) has one table per ``eventType``; a new event type is a new table, not new
code. Rules are checked when the bridge starts, so a typo stops the deploy instead of
dead-lettering every event of that type at run time.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Any

from notify import names
from notify.cache_keys import CacheKeyTemplate, MissingValue
from notify.publish import Notification

from .envelope import Envelope, EnvelopeError

_KEYS = {"notification", "recipients", "fields", "rename", "invalidate", "cache_keys"}


class RuleError(Exception):
    """A rule file that cannot be used; the message names the event type and the key."""


@dataclass(frozen=True, slots=True)
class Rule:
    event_type: str
    notification: str
    recipients: tuple[str, ...]
    fields: tuple[str, ...]
    rename: Mapping[str, str]
    invalidate: tuple[str, ...]
    cache_keys: tuple[CacheKeyTemplate, ...]


# Not frozen, like envelope.Envelope: one per event on the bridge's hot path.
@dataclass(slots=True)
class Outcome:
    """What one event turns into: cache keys to delete first, then notifications to push."""

    cache_keys: list[str]
    notifications: list[Notification]
    occurred_at: datetime | None


def load(path: str | None) -> dict[str, Rule]:
    if path is None:
        text = resources.files(__package__).joinpath("rules.toml").read_text()
        origin = "built-in rules"
    else:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise RuleError(f"{path}: {exc.strerror}") from None
        origin = path
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RuleError(f"{origin}: {exc}") from None
    return {event_type: _rule(event_type, table) for event_type, table in doc.items()}


def _rule(event_type: str, table: Any) -> Rule:
    where = f"rule {event_type}"
    if not names.EVENT_NAME.match(event_type):
        raise RuleError(f"{where}: event types are written like PURCHASE_CREATED")
    if not isinstance(table, dict):
        raise RuleError(f"{where}: must be a table")
    unknown = set(table) - _KEYS
    if unknown:
        raise RuleError(f"{where}: unknown key {sorted(unknown)[0]!r}; known: {sorted(_KEYS)}")
    notification = table.get("notification")
    if not isinstance(notification, str) or not names.EVENT_NAME.match(notification):
        raise RuleError(f"{where}: notification must be a name like COURSE_PURCHASED")
    recipients = _names(where, table, "recipients", names.FIELD)
    if not recipients:
        raise RuleError(f"{where}: recipients must name at least one field of data")
    fields = _names(where, table, "fields", names.FIELD)
    rename = table.get("rename", {})
    if not isinstance(rename, dict) or not all(
        isinstance(v, str) and names.FIELD.match(v) for v in rename.values()
    ):
        raise RuleError(f"{where}: rename must map field names to field names")
    for source in rename:
        if source not in fields:
            raise RuleError(f"{where}: rename names {source!r}, which is not in fields")
    cache_keys = tuple(
        _template(where, text, set(recipients) | set(fields))
        for text in _names(where, table, "cache_keys", None)
    )
    return Rule(
        event_type=event_type,
        notification=notification,
        recipients=recipients,
        fields=fields,
        rename=dict(rename),
        invalidate=_names(where, table, "invalidate", names.STORE_NAME),
        cache_keys=cache_keys,
    )


def _names(
    where: str, table: dict[str, Any], key: str, pattern: re.Pattern[str] | None
) -> tuple[str, ...]:
    value = table.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise RuleError(f"{where}: {key} must be a list of strings")
    for item in value:
        if pattern is not None and not pattern.match(item):
            raise RuleError(f"{where}: {key} has an invalid entry {item!r}")
    return tuple(value)


def _template(where: str, text: str, known: set[str]) -> CacheKeyTemplate:
    try:
        template = CacheKeyTemplate.parse(text)
    except ValueError as exc:
        raise RuleError(f"{where}: {exc}") from None
    for name in sorted(template.fields - known):
        raise RuleError(
            f"{where}: cache key template {text!r} uses {name!r}, "
            "which is neither a recipient nor a field"
        )
    return template


def apply(rule: Rule, envelope: Envelope) -> Outcome:
    """The cache deletions and notifications for one event; EnvelopeError if data lacks them."""
    data = envelope.data
    users = []
    for field in rule.recipients:
        user = data.get(field)
        if not isinstance(user, str) or not names.valid_id(user):
            raise EnvelopeError(f"data.{field} (a recipient) is missing or not a valid user id")
        users.append(user)
    payload = {rule.rename.get(f, f): data[f] for f in rule.fields if f in data}
    cache_keys = [_render(template, data) for template in rule.cache_keys]
    notifications = [
        Notification(
            user_id=user,
            event=rule.notification,
            data=payload,
            invalidate=rule.invalidate,
            # The type too: a producer reusing one id for several kinds of events (an
            # aggregate's id) must not have the second kind taken for the first.
            dedupe_key=f"ev:{envelope.event_type}:{envelope.event_id}",
        )
        for user in dict.fromkeys(users)
    ]
    return Outcome(cache_keys, notifications, envelope.occurred_at)


def _render(template: CacheKeyTemplate, data: Mapping[str, Any]) -> str:
    try:
        return template.render(data)
    except MissingValue as exc:
        raise EnvelopeError(
            f"data.{exc.field} (used in cache key {template.text!r}) is missing"
        ) from None
