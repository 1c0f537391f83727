"""Logging: one JSON object per line, and no credentials in any of them.

The gateway logs each WebSocket handshake's path at INFO (and websockets, at DEBUG, its
headers), query string included, and ``?token=`` carries a student's JWT. The filter
rewrites such records before any handler sees them.

Redaction works on what the gateway parses, not on spellings: a query string is decoded as
the gateway decodes it (``?%74oken=`` is ``token``), and an ``Authorization`` header loses
its value whatever the case of its scheme, since the gateway accepts any.
"""

from __future__ import annotations

import logging
import re
import sys
from datetime import UTC, datetime
from urllib.parse import parse_qsl, urlencode

import orjson

# A query string, up to what ends a URL in a log line.
_QUERY = re.compile(r"\?([^\s\"'#]*)")
# A header's whole value (any scheme), or a bearer token wherever it stands.
_AUTHORIZATION = re.compile(r"(?i)(authorization[\"']?\s*[:=,]\s*[\"']?)[^\"'\r\n]+")
_BEARER = re.compile(r"(?i)(bearer\s+)[^\s\"',]+")
_REDACTED = "[redacted]"
# uvicorn's loggers print request lines. Records are filtered where they are created, so the
# filter sits on the loggers rather than on whichever handlers happen to exist; the
# gateway's own request logger adds it itself (:func:`redacted`), by its module's name.
_REQUEST_LOGGERS = ("uvicorn.error", "uvicorn.access")


def redact(text: str) -> str:
    text = _QUERY.sub(_redact_query, text)
    text = _AUTHORIZATION.sub(rf"\1{_REDACTED}", text)
    return _BEARER.sub(rf"\1{_REDACTED}", text)


def redact_url(url: str) -> str:
    """``url`` with the value of every query parameter the gateway reads as ``token``."""
    return _QUERY.sub(_redact_query, url)


def _redact_query(match: re.Match[str]) -> str:
    params = parse_qsl(match.group(1), keep_blank_values=True)
    if not any(name.lower() == "token" for name, _ in params):
        return match.group(0)
    return "?" + urlencode(
        [(name, _REDACTED if name.lower() == "token" else value) for name, value in params],
        safe="[]",
    )


class RedactSecrets(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = redact(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        return True


def redacted(logger: logging.Logger) -> logging.Logger:
    """``logger``, with credentials redacted from every record it creates."""
    if not any(isinstance(f, RedactSecrets) for f in logger.filters):
        logger.addFilter(RedactSecrets())
    return logger


def install() -> None:
    for name in _REQUEST_LOGGERS:
        redacted(logging.getLogger(name))


class JsonFormatter(logging.Formatter):
    """``{"time", "level", "process", "logger", "message"[, "exception"]}``, one line per
    record: what log shippers read."""

    def __init__(self, process: str) -> None:
        super().__init__()
        self._process = process

    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "process": self._process,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            doc["exception"] = redact(self.formatException(record.exc_info))
        return orjson.dumps(doc).decode()


_COLOURS = {"DEBUG": "2", "INFO": "36", "WARNING": "33", "ERROR": "31", "CRITICAL": "1;31"}


class ReadableFormatter(logging.Formatter):
    """``12:03:44.120 WARNING gateway  message``, coloured by level: for a person at a
    terminal (``notify dev``), not for a log shipper."""

    def __init__(self, process: str) -> None:
        super().__init__()
        self._process = process

    def format(self, record: logging.LogRecord) -> str:
        when = datetime.fromtimestamp(record.created).strftime("%H:%M:%S.%f")[:-3]
        level = f"\x1b[{_COLOURS.get(record.levelname, '0')}m{record.levelname:<7}\x1b[0m"
        line = f"\x1b[2m{when}\x1b[0m {level} {self._process:<8} {record.getMessage()}"
        if record.exc_info:
            line += "\n" + redact(self.formatException(record.exc_info))
        return line


def configure(level: str, process: str) -> None:
    """Process-wide logging for the services at ``level``, on stderr: JSON lines, or
    readable lines when stderr is a terminal. ``process`` names the service in each line."""
    handler = logging.StreamHandler(sys.stderr)
    formatter = ReadableFormatter if sys.stderr.isatty() else JsonFormatter
    handler.setFormatter(formatter(process))
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level.upper() if level.upper() in logging.getLevelNamesMapping() else "INFO")
    install()
