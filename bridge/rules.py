"""Declarative mapping from Kafka domain events to notifications and cache deletions.

A rule file (TOML) has one table per ``eventType``; a new event type is a new table, not new
code. Rules are checked when the bridge starts, so a typo stops the deploy instead of
dead-lettering every event of that type at run time.
"""

from __future__ import annotations

import re
import string
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Any

from notify.keys import valid_user_id
from notify.publish import Notification

from .envelope import Envelope, EnvelopeError

EVENT_NAME = re.compile(r"^[A-Z][A-Z0-9_]{0,63}$")
_FIELD = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
_STORE = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")
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
    cache_keys: tuple[str, ...]


@dataclass(frozen=True, slots=True)
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
    if not EVENT_NAME.match(event_type):
        raise RuleError(f"{where}: event types are written like PURCHASE_CREATED")
    if not isinstance(table, dict):
        raise RuleError(f"{where}: must be a table")
    unknown = set(table) - _KEYS
    if unknown:
        raise RuleError(f"{where}: unknown key {sorted(unknown)[0]!r}; known: {sorted(_KEYS)}")
    notification = table.get("notification")
    if not isinstance(notification, str) or not EVENT_NAME.match(notification):
        raise RuleError(f"{where}: notification must be a name like COURSE_PURCHASED")
    recipients = _names(where, table, "recipients", _FIELD)
    if not recipients:
        raise RuleError(f"{where}: recipients must name at least one field of data")
    fields = _names(where, table, "fields", _FIELD)
    rename = table.get("rename", {})
    if not isinstance(rename, dict) or not all(
        isinstance(v, str) and _FIELD.match(v) for v in rename.values()
    ):
        raise RuleError(f"{where}: rename must map field names to field names")
    for source in rename:
        if source not in fields:
            raise RuleError(f"{where}: rename names {source!r}, which is not in fields")
    cache_keys = _names(where, table, "cache_keys", None)
    for template in cache_keys:
        _check_template(where, template, set(recipients) | set(fields))
    return Rule(
        event_type=event_type,
        notification=notification,
        recipients=recipients,
        fields=fields,
        rename=dict(rename),
        invalidate=_names(where, table, "invalidate", _STORE),
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


def _check_template(where: str, template: str, known: set[str]) -> None:
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise RuleError(f"{where}: bad cache key template {template!r}: {exc}") from None
    for _literal, name, spec, conversion in parts:
        if name is None:
            continue
        if spec or conversion or not _FIELD.match(name):
            raise RuleError(f"{where}: cache key template {template!r}: use plain {{field}}")
        if name not in known:
            raise RuleError(
                f"{where}: cache key template {template!r} uses {name!r}, "
                "which is neither a recipient nor a field"
            )


def apply(rule: Rule, envelope: Envelope) -> Outcome:
    """The cache deletions and notifications for one event; EnvelopeError if data lacks them."""
    data = envelope.data
    users = []
    for field in rule.recipients:
        user = data.get(field)
        if not isinstance(user, str) or not valid_user_id(user):
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
            dedupe_key=f"ev:{envelope.event_id}",
        )
        for user in dict.fromkeys(users)
    ]
    return Outcome(cache_keys, notifications, envelope.occurred_at)


def _render(template: str, data: Mapping[str, Any]) -> str:
    values = {}
    for _literal, name, _spec, _conversion in string.Formatter().parse(template):
        if name is None:
            continue
        value = data.get(name)
        if not isinstance(value, str | int) or isinstance(value, bool) or value == "":
            raise EnvelopeError(f"data.{name} (used in cache key {template!r}) is missing")
        values[name] = value
    return template.format_map(values)
