"""The operator side of the CLI: the HTTP API from a terminal.

``notify trigger-update``, ``publish``, ``presence`` and ``history`` talk to a running
gateway at ``NOTIFY_URL`` with ``NOTIFY_API_KEY``. They print readable results and exit
non-zero with the server's own error message when a call fails.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit

import orjson

from .config import ConfigError

TIMEOUT = 15.0


class CallFailed(Exception):
    """The message to print: the server's error, or why it could not be reached."""


@dataclass(frozen=True, slots=True)
class Client:
    url: str
    key: str

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Client:
        url = env.get("NOTIFY_URL", "").strip().rstrip("/")
        if urlsplit(url).scheme not in ("http", "https"):
            raise ConfigError("NOTIFY_URL", "is required (for example http://127.0.0.1:8000)")
        key = env.get("NOTIFY_API_KEY", "").strip()
        if not key:
            raise ConfigError("NOTIFY_API_KEY", "is required (one of the gateway's API keys)")
        return cls(url, key)

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        request = urllib.request.Request(  # noqa: S310 - the scheme is checked in from_env
            self.url + path,
            method=method,
            data=None if body is None else orjson.dumps(body),
            headers={"Authorization": f"Bearer {self.key}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT) as response:  # noqa: S310
                return orjson.loads(response.read())
        except urllib.error.HTTPError as exc:
            raise CallFailed(_server_error(exc)) from None
        except (urllib.error.URLError, OSError) as exc:
            raise CallFailed(f"cannot reach {self.url}: {exc}") from None


def _server_error(exc: urllib.error.HTTPError) -> str:
    try:
        error = orjson.loads(exc.read())["error"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return f"HTTP {exc.code}"
    field = f" (field {error['field']})" if error.get("field") else ""
    return f"HTTP {exc.code} {error['code']}: {error['message']}{field}"


def user_path(prefix: str, user: str) -> str:
    return f"{prefix}/{quote(user, safe='')}"


def trigger_update(client: Client, student: str, course: str | None, reason: str | None) -> str:
    body: dict[str, Any] = {"student_id": student}
    if course:
        body["course_id"] = course
    if reason:
        body["reason"] = reason
    result = client.call("POST", "/api/trigger-update", body)
    deleted = ", ".join(result["cache_keys_deleted"]) or "none (already absent)"
    online = result["connections"]
    return (
        f"pushed {result['id']} to {student}\n"
        f"cache keys deleted: {deleted}\n"
        f"connected devices: {online}"
        + ("" if online else " (the app will catch up when it reconnects)")
    )


def publish(client: Client, user: str, event: str, data: str | None, stores: str | None) -> str:
    body: dict[str, Any] = {"user_id": user, "event": event}
    if data:
        try:
            body["data"] = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise CallFailed(f"--data is not JSON: {exc}") from None
    if stores:
        body["invalidate"] = [s.strip() for s in stores.split(",") if s.strip()]
    [event_id] = client.call("POST", "/api/publish", body)["ids"]
    return f"published {event_id} to {user}"


def presence(client: Client, user: str) -> str:
    result = client.call("GET", user_path("/api/presence", user))
    return f"{user}: {result['connections']} connection(s)"


def history(client: Client, user: str, limit: int) -> str:
    events = client.call("GET", user_path("/api/history", user) + f"?limit={limit}")["events"]
    if not events:
        return f"{user}: no notifications in history"
    lines = [
        f"{e['id']:<24} {e['event']:<24} {orjson.dumps(e['data']).decode()}"
        f"  invalidate={','.join(e['invalidate']) or '-'}"
        for e in events
    ]
    return "\n".join(lines)
