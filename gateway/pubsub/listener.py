"""What the Pub/Sub reader tells the layer above it, and what a shard tells the reader.

The reader knows nothing of students or sockets: the composition root registers a listener
(the hub), as Centrifuge's broker knows only its event handler.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol


class PubSubListener(Protocol):
    def message(self, channel: bytes, payload: bytes) -> None:
        """One frame published on ``channel``; never awaits."""

    def flush(self) -> None:
        """The end of one socket read: write what the messages since the last flush queued."""

    def hold(self, channels: Iterable[str]) -> None:
        """These channels lost their subscription: frames published from now on are unseen."""

    def catch_up(self, channels: Iterable[str]) -> None:
        """These channels are subscribed again: fill what they missed from history."""

    def reconnected(self) -> None:
        """A Pub/Sub connection was replaced (after a drop, a refusal or a silent probe)."""


class Topology(Protocol):
    """What a shard reports to the reader that routes channels between shards."""

    def displaced(self, channel: str) -> None:
        """A wanted channel's slot left this shard: route it again."""

    def refresh(self) -> None:
        """The slot map may have changed: read it again soon."""

    def shard_changed(self) -> None:
        """A shard connected or dropped: recompute readiness."""
