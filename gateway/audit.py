"""The operators' audit log: one Redis Stream entry per trigger-update call.

The incident reports' manual scripts left no trace of who changed what for whom. Every
trigger-update call, accepted or not, is recorded with its caller (the API key's name),
time, student, reason and result.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson

from notify.keys import Keys
from notify.redis_client import Client, text

# Approximate trimming keeps the stream bounded at O(1) cost per append.
MAX_ENTRIES = 100_000


async def append(redis: Client, keys: Keys, entry: dict[str, Any]) -> None:
    record = {"time": datetime.now(UTC).isoformat(timespec="milliseconds"), **entry}
    await redis.xadd(
        keys.audit, {"entry": orjson.dumps(record)}, maxlen=MAX_ENTRIES, approximate=True
    )


async def recent(redis: Client, keys: Keys, limit: int) -> list[dict[str, Any]]:
    """Newest first."""
    rows: list[Any] = await redis.xrevrange(keys.audit, count=limit) or []
    return [{"id": text(entry_id), **orjson.loads(fields[b"entry"])} for entry_id, fields in rows]
