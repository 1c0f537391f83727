"""Keeping credentials out of the logs.

uvicorn's WebSocket backends log each handshake's path at INFO, query string included, and
``?token=`` carries a student's JWT. The filter rewrites such records before any handler
sees them.
"""

from __future__ import annotations

import logging
import re

_SECRET = re.compile(r"(token=|[Bb]earer\s+)[^\s&\"']+")
# Loggers that print request lines; records are filtered where they are created, so the
# filter sits on these loggers rather than on whichever handlers happen to exist.
_REQUEST_LOGGERS = ("uvicorn.error", "uvicorn.access")


def redact(text: str) -> str:
    return _SECRET.sub(r"\1[redacted]", text)


class RedactSecrets(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = redact(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        return True


def install() -> None:
    for name in _REQUEST_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactSecrets) for f in logger.filters):
            logger.addFilter(RedactSecrets())
