"""The gateway's Prometheus metrics, served at ``/metrics``.

The fan-out path counts once per message (frames times connections), never once per
connection, so measuring costs the same whether a student has one device or ten.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class GatewayMetrics:
    def __init__(self, connections: Callable[[], int]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.connections = Gauge(
            "notify_gateway_connections", "Open WebSocket connections.", registry=r
        )
        self.connections.set_function(connections)
        self.pushed = Counter(
            "notify_gateway_notifications_pushed",
            "Event frames queued to sockets: live, or replayed from history on resume.",
            ["source"],
            registry=r,
        )
        self.bytes = Counter(
            "notify_gateway_live_bytes_pushed", "Bytes of live event frames queued.", registry=r
        )
        self.slow_closes = Counter(
            "notify_gateway_slow_consumer_closes",
            "Connections closed (4008) because their live send queue overflowed.",
            registry=r,
        )
        self.resumes = Counter(
            "notify_gateway_resumes",
            "Connections that came with since, by outcome (recovered or resync).",
            ["outcome"],
            registry=r,
        )
        self.pubsub_reconnects = Counter(
            "notify_gateway_pubsub_reconnects",
            "Times the Pub/Sub connection was replaced and every client caught up.",
            registry=r,
        )
        self.publish_to_fanout = Histogram(
            "notify_gateway_publish_to_fanout_seconds",
            "From an event's publish (its ts) to its frames being queued to this process's "
            "sockets.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
