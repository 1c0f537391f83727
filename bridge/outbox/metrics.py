"""The outbox relay's Prometheus metrics, served at ``/metrics`` on ``OUTBOX_PORT``."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# From a row's commit (its created_at) to a stage being done with it.
_LAG_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600)
_AGE_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 5, 30, 60, 300, 3600, 86_400)


class OutboxMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.depth = Gauge(
            "notify_outbox_depth", "Rows a stage has still to do.", ["stage"], registry=r
        )
        self.oldest = Gauge(
            "notify_outbox_oldest_pending_seconds",
            "Age of the oldest row a stage has still to do (0 when none).",
            ["stage"],
            registry=r,
        )
        self.failed_rows = Gauge(
            "notify_outbox_failed_rows", "Rows set aside as failed, in the table.", registry=r
        )
        self.done = Counter(
            "notify_outbox_rows", "Rows a stage is done with.", ["stage"], registry=r
        )
        self.failed = Counter(
            "notify_outbox_rows_failed",
            "Rows set aside as failed, by the stage that failed them.",
            ["stage"],
            registry=r,
        )
        self.lag = Histogram(
            "notify_outbox_lag_seconds",
            "From a batch's oldest row's created_at to the stage being done with the batch.",
            ["stage"],
            buckets=_LAG_BUCKETS,
            registry=r,
        )
        # What handling.publish counts, as the bridge does.
        self.published = Counter(
            "notify_outbox_notifications_published",
            "Notifications published to a student (history + live).",
            ["event"],
            registry=r,
        )
        self.deduplicated = Counter(
            "notify_outbox_notifications_deduplicated",
            "Notifications skipped because their event id was already published to that user.",
            registry=r,
        )
        self.unknown_type = Counter(
            "notify_outbox_events_unknown_type",
            "Rows with no rule for their event type (notified as done, nothing pushed).",
            registry=r,
        )
        self.cache_keys_deleted = Counter(
            "notify_outbox_cache_keys_deleted",
            "Backend cache keys deleted (whether or not they existed).",
            registry=r,
        )
        self.event_age = Histogram(
            "notify_outbox_event_age_seconds",
            "Time from an event's occurredAt to its publish.",
            buckets=_AGE_BUCKETS,
            registry=r,
        )
