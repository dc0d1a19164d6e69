"""infra/grafana/ugt-serving.json queries only metrics the service exports, with the labels it uses."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.parser import text_string_to_metric_families

from serving.metrics import ServingMetrics

DASHBOARD = Path(__file__).resolve().parents[2] / "infra" / "grafana" / "ugt-serving.json"


def exported() -> dict[str, set[str]]:
    """Series name -> label names of every metric of ServingMetrics (histogram _bucket/_sum/_count too)."""
    out: dict[str, set[str]] = {}
    metrics = ServingMetrics()
    metrics.watch_kv_caches({"movie": SimpleNamespace(hits=1, misses=1)})  # a custom collector: read its output
    from serving.live_items import LiveStats

    live = LiveStats(items=2, rejected={"known": 1}, feed_errors=1, version="v1", state="following")
    metrics.watch_live_items({"movie": SimpleNamespace(live=SimpleNamespace(stats=live))})
    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            out.setdefault(sample.name, set()).update(sample.labels)
    for metric in vars(metrics).values():
        if not isinstance(metric, MetricWrapperBase):
            continue
        name, labels = metric._name, set(metric._labelnames)  # noqa: SLF001 (no public accessor)
        kind = metric._type  # noqa: SLF001
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}.get(kind, ("",))
        for suffix in suffixes:
            out[name + suffix] = labels
    return out


def test_every_dashboard_query_uses_exported_series_and_labels():
    series = exported()
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for panel in dash["panels"] for t in panel["targets"]]
    assert len(exprs) >= 8
    for expr in exprs:
        for name in re.findall(r"ugt_serving_\w+", expr):
            assert name in series, f"{name} in {expr!r} is not exported by serving/metrics.py"
        for label in re.findall(r"by \(([^)]*)\)", expr):
            for lab in (x.strip() for x in label.split(",")):
                if lab not in ("le", "job"):
                    names = re.findall(r"ugt_serving_\w+", expr)
                    assert any(lab in series[n] for n in names), f"label {lab!r} not on {names}"


def test_metric_names_follow_prometheus_conventions():
    for family in ServingMetrics().registry.collect():
        assert family.name.startswith("ugt_serving_")
        if family.type == "counter":
            assert any(s.name.endswith("_total") for s in family.samples) or not family.samples
        if family.type == "histogram" and "seconds" not in family.name:
            assert family.name.endswith("batch_size")
