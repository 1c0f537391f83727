"""The bridge's Prometheus metrics.

Each Bridge owns a registry rather than using the global one, so several bridges (tests,
or a future multi-consumer process) never collide on metric names.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Event age at publish (now - occurredAt): from a healthy ~10 ms up to an outage backlog.
_AGE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600)


class BridgeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.consumed = Counter(
            "notify_bridge_events_consumed", "Kafka messages read.", ["topic"], registry=r
        )
        self.published = Counter(
            "notify_bridge_notifications_published",
            "Notifications published to a student (history + live).",
            ["event"],
            registry=r,
        )
        self.deduplicated = Counter(
            "notify_bridge_notifications_deduplicated",
            "Notifications skipped because their eventId was already published to that user.",
            registry=r,
        )
        self.dead_lettered = Counter(
            "notify_bridge_events_dead_lettered",
            "Messages sent to the dead-letter topic.",
            ["topic"],
            registry=r,
        )
        self.dead_letters_truncated = Counter(
            "notify_bridge_dead_letters_truncated",
            "Dead letters the producer or topic refused whole, sent as a truncated copy.",
            registry=r,
        )
        self.unknown_type = Counter(
            "notify_bridge_events_unknown_type",
            "Events skipped because no rule names their eventType.",
            registry=r,
        )
        self.cache_keys_deleted = Counter(
            "notify_bridge_cache_keys_deleted",
            "Backend cache keys deleted (whether or not they existed).",
            registry=r,
        )
        self.commit_failures = Counter(
            "notify_bridge_commit_failures", "Offset commits that failed.", registry=r
        )
        self.lag = Gauge(
            "notify_bridge_consumer_lag",
            "Messages between the committed position and the partition's end.",
            ["topic", "partition"],
            registry=r,
        )
        self.event_age = Histogram(
            "notify_bridge_event_age_seconds",
            "Time from an event's occurredAt to its publish.",
            buckets=_AGE_BUCKETS,
            registry=r,
        )
