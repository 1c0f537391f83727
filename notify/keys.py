"""Redis key and channel names, for one deployment.

Every name of one student carries the hash tag ``{u:<id>}``, so the student's metadata,
history, dedupe markers and channel live in one Redis Cluster slot: the publish function
touches them atomically, and the same code runs on a single node or a cluster.

Every name also carries the deployment's namespace. Keys alone would be separated by the
database index, but Pub/Sub channels are global to a Redis server: two deployments sharing
one (staging and production on databases 13 and 14) would deliver each other's events. The
namespace goes inside the hash tag (``{<ns>:u:<id>}``), so a channel is never shared, in a
cluster or not. The default namespace of database 0 is empty, which keeps the names every
deployment used before namespaces existed.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Keys:
    namespace: str = ""
    _tag: str = field(init=False, repr=False)
    _channel_prefix: bytes = field(init=False, repr=False)
    _process_wide: str = field(init=False, repr=False)

    def __post_init__(self) -> None:
        scope = f"{self.namespace}:" if self.namespace else ""
        object.__setattr__(self, "_tag", f"{{{scope}u:")
        object.__setattr__(self, "_channel_prefix", f"{{{scope}u:".encode())
        object.__setattr__(self, "_process_wide", f"notify:{scope}")

    # Process-wide streams and counters, outside any student's slot.

    @property
    def audit(self) -> str:
        """Stream of the operators' audited actions."""
        return f"{self._process_wide}audit"

    def process(self, process_id: str) -> str:
        """Heartbeat of one gateway process; presence counts of a process without it are void."""
        return f"{self._process_wide}process:{process_id}"

    def probe(self, process_id: str, tag: int) -> str:
        """A gateway process's Pub/Sub probe channel; ``tag`` picks its slot (its shard)."""
        return f"{self._process_wide}probe:{process_id}:{{{tag}}}"

    def position(self, topic: str, partition: int) -> str:
        """How far the bridge has handled a Kafka partition: ``<offset> <timestamp>``
        (bridge/positions.py). (Versions before 2026-12-03 kept a position per student, in
        a ``{u:<id>}:kafka`` hash.)"""
        return f"{self._process_wide}kafka:{topic}/{partition}"

    # One student's names, all in the student's slot.

    def incarnation(self, user: str) -> str:
        """String: which incarnation of the history is current (library.lua says what it
        holds). (Versions before the function library kept it in a ``:meta`` hash.)"""
        return f"{self._tag}{user}}}:incarnation"

    def history(self, user: str) -> str:
        """List of the student's recent events: each the frame after its id, numbered by the
        base the incarnation keeps plus its place in the list. (Versions that kept whole
        frames used ``:hist``, and a stream before the function library.)"""
        return f"{self._tag}{user}}}:events"

    def dedupe(self, user: str, key: str) -> str:
        """Marker holding the id already published for an event id or idempotency key."""
        return f"{self._tag}{user}}}:dedupe:{key}"

    def presence(self, user: str) -> str:
        """Hash gateway process id -> the student's connection count on that process."""
        return f"{self._tag}{user}}}:presence"

    def channel(self, user: str) -> str:
        return f"{self._tag}{user}}}:chan"

    def user_of_channel(self, name: bytes) -> str | None:
        if name.startswith(self._channel_prefix) and name.endswith(b"}:chan"):
            return name[len(self._channel_prefix) : -len(b"}:chan")].decode()
        return None
