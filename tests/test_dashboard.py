"""docs/grafana-dashboard.json queries only metrics the processes export."""

from __future__ import annotations

import json
import re
from pathlib import Path

from bridge.metrics import BridgeMetrics
from gateway.metrics import GatewayMetrics

DASHBOARD = Path(__file__).resolve().parents[1] / "docs" / "grafana-dashboard.json"
# Exported names carry a suffix the registry's metric family does not.
_METRIC = re.compile(r"\b(notify_(?:gateway|bridge)_[a-z_]+?)(?:_total|_bucket|_sum|_count)?\b")
# The serving-path rewrite adds it; the dashboard shows it from the start.
ANNOUNCED = {"notify_gateway_publish_to_write_seconds"}


def test_dashboard_queries_only_exported_metrics() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    used = {name for expr in exprs for name in _METRIC.findall(expr)}
    exported = {
        family.name
        for registry in (GatewayMetrics(lambda: 0).registry, BridgeMetrics().registry)
        for family in registry.collect()
    }
    assert used
    assert used <= exported | ANNOUNCED, used - exported - ANNOUNCED
