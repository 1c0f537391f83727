"""Templates of the backend's server-side cache keys, such as ``student:home:{studentId}``.

The rules name the keys each event invalidates, and ``NOTIFY_CACHE_KEYS`` the ones an
operator's trigger-update deletes; both are this one type, checked when they are loaded
(so a typo stops the deploy) and rendered with one event's or one request's values.
"""

from __future__ import annotations

import string
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from . import names


class MissingValue(Exception):
    """A template's field has no usable value; ``field`` names it."""

    def __init__(self, field: str) -> None:
        super().__init__(field)
        self.field = field


@dataclass(frozen=True, slots=True)
class CacheKeyTemplate:
    text: str
    fields: frozenset[str]

    @classmethod
    def parse(cls, text: str) -> CacheKeyTemplate:
        """ValueError, saying why, for anything but literal text and plain ``{field}``s."""
        try:
            parts = list(string.Formatter().parse(text))
        except ValueError as exc:
            raise ValueError(f"bad cache key template {text!r}: {exc}") from None
        fields = set()
        for _literal, name, spec, conversion in parts:
            if name is None:
                continue
            if spec or conversion or not names.FIELD.match(name):
                raise ValueError(f"cache key template {text!r}: use plain {{field}}")
            fields.add(name)
        return cls(text, frozenset(fields))

    def render(self, values: Mapping[str, Any]) -> str:
        """The key for ``values``; MissingValue if a field is absent, empty or not a scalar."""
        chosen = {}
        for field in self.fields:
            value = values.get(field)
            if not isinstance(value, str | int) or isinstance(value, bool) or value == "":
                raise MissingValue(field)
            chosen[field] = value
        return self.text.format_map(chosen)

    def __str__(self) -> str:
        return self.text
