"""The gateway's Prometheus metrics, served at ``/metrics``.

The fan-out path counts once per message (frames times connections), never once per
connection, so measuring costs the same whether a student has one device or ten. Its
counters are plain integers that :class:`FanoutMetrics` exports when scraped:
prometheus-client's own Counter and Histogram take a lock on every update, which at tens of
thousands of messages per second was a fifth of the process's CPU (bench/run.py, py-spy).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class GatewayMetrics:
    def __init__(self, connections: Callable[[], int]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.connections = Gauge(
            "notify_gateway_connections", "Open WebSocket connections.", registry=r
        )
        self.connections.set_function(connections)
        self.fanout = FanoutMetrics()
        r.register(self.fanout)
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
        self.refused_connections = Counter(
            "notify_gateway_connections_refused",
            "TCP connections refused or dropped before their request: over the pending cap, "
            "over the per-address rate, or past the handshake deadline.",
            ["reason"],
            registry=r,
        )
        self.api_refused = Counter(
            "notify_gateway_api_refused",
            "API calls answered with an error, by action and HTTP status (not audited).",
            ["action", "status"],
            registry=r,
        )
        self.pubsub_reconnects = Counter(
            "notify_gateway_pubsub_reconnects",
            "Times a Pub/Sub connection (one per Redis shard) was replaced and its clients "
            "caught up.",
            registry=r,
        )


class FanoutMetrics(Collector):
    """Pushes, bytes and publish-to-write latency, counted without locks.

    Updated only from the event loop's thread, so plain integers are exact.
    """

    def __init__(self) -> None:
        self.pushed = {"live": 0, "replay": 0}
        self.bytes = 0
        self._bounds = _LATENCY_BUCKETS
        # One count per bucket plus +Inf; observations land in the first bucket >= them.
        self._counts = [0] * (len(_LATENCY_BUCKETS) + 1)
        self._sum = 0.0

    def observe_latency(self, seconds: float) -> None:
        self._counts[bisect.bisect_left(self._bounds, seconds)] += 1
        self._sum += seconds

    def collect(self) -> Iterator[Metric]:
        pushed = CounterMetricFamily(
            "notify_gateway_notifications_pushed",
            "Event frames written or queued to sockets: live, or replayed from history.",
            labels=["source"],
        )
        for source, count in self.pushed.items():
            pushed.add_metric([source], count)
        yield pushed
        yield CounterMetricFamily(
            "notify_gateway_live_bytes_pushed",
            "Bytes of live event frames written or queued.",
            value=self.bytes,
        )
        cumulative, buckets = 0, []
        labels = (*map(floatToGoString, self._bounds), "+Inf")  # as prometheus-client's own
        for bound, count in zip(labels, self._counts, strict=True):
            cumulative += count
            buckets.append((bound, cumulative))
        yield HistogramMetricFamily(
            "notify_gateway_publish_to_write_seconds",
            "From an event's publish (its ts, whole milliseconds) to its frame being written "
            "to this process's sockets (or queued on those not reading).",
            buckets=buckets,
            sum_value=self._sum,
        )
