"""The names the system accepts, each defined once: ids, event names, store names, fields.

The rule file, the HTTP API, its OpenAPI document, the JWT check and the Redis key layout
all validate with these patterns, and their error messages quote :func:`shape`, so a name
accepted in one place is accepted everywhere and every message states the same rule.
"""

from __future__ import annotations

import re

# A student's or a course's id, from JWT ``sub`` claims and event fields: UUIDs, numeric
# ids, e-mail-like ids. The limit keeps Redis keys short and bars braces, which would
# change a key's hash tag.
ID = re.compile(r"^[A-Za-z0-9_.:@|+-]{1,128}$")
# A domain event type or a notification's name: PURCHASE_CREATED, COURSE_PURCHASED.
EVENT_NAME = re.compile(r"^[A-Z][A-Z0-9_]{0,63}$")
# An app store the gateway may tell clients to reload: home, learning.
STORE_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")
# A field of an event's data, as the rules name it.
FIELD = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")


def shape(pattern: re.Pattern[str]) -> str:
    """The pattern as an error message quotes it: ``[A-Z][A-Z0-9_]{0,63}``."""
    return pattern.pattern.removeprefix("^").removesuffix("$")


def valid_id(value: str) -> bool:
    return ID.match(value) is not None
