"""Redis key and channel names for one student.

Every name carries the hash tag ``{u:<id>}``, so a student's metadata, history, dedupe
markers and channel live in one Redis Cluster slot: the publish script touches them
atomically, and the same code runs on a single node or a cluster.
"""

from __future__ import annotations

_CHANNEL_PREFIX = b"{u:"
_CHANNEL_SUFFIX = b"}:chan"


# Process-wide streams and counters, outside any student's slot.
AUDIT = "notify:audit"


def rate(bucket: str, second: int) -> str:
    """Requests counted in one second for one API key (or one client address)."""
    return f"notify:rate:{bucket}:{second}"


def meta(user: str) -> str:
    """Hash with ``epoch`` and ``seq``: the history's incarnation and last sequence number."""
    return f"{{u:{user}}}:meta"


def history(user: str) -> str:
    """Stream of the student's recent event frames, entry id ``0-<seq>``."""
    return f"{{u:{user}}}:hist"


def dedupe(user: str, key: str) -> str:
    """Marker holding the id already published for an event id or idempotency key."""
    return f"{{u:{user}}}:dedupe:{key}"


def presence(user: str) -> str:
    """Hash gateway process id -> the student's connection count on that process."""
    return f"{{u:{user}}}:presence"


def process(process_id: str) -> str:
    """Heartbeat of one gateway process; presence counts of a process without it are void."""
    return f"notify:process:{process_id}"


def channel(user: str) -> str:
    return f"{{u:{user}}}:chan"


def user_of_channel(name: bytes) -> str | None:
    if name.startswith(_CHANNEL_PREFIX) and name.endswith(_CHANNEL_SUFFIX):
        return name[len(_CHANNEL_PREFIX) : -len(_CHANNEL_SUFFIX)].decode()
    return None
