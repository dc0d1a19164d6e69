"""infra/grafana/ugt-serving.json queries only metrics the service (and, in the per-arm row, the feedback_join job)
exports, with the labels they carry."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.parser import text_string_to_metric_families

from jobs.feedback_join_logic import ARM_COUNTERS
from serving.metrics import ServingMetrics

DASHBOARD = Path(__file__).resolve().parents[2] / "infra" / "grafana" / "ugt-serving.json"
# Flink's Prometheus reporter names a metric by its logical scope: a key-value group's key joins the name and its
# value becomes a label (docs/JOBS.md: group ugt, reason=<code>, counter dead_lettered ->
# flink_taskmanager_job_task_operator_ugt_reason_dead_lettered{reason}). feedback_join's per-arm counters sit in
# ugt -> experiment=<e> -> arm=<a> (jobs/operators/feedback_join_fn.py).
FLINK_ARM_PREFIX = "flink_taskmanager_job_task_operator_ugt_experiment_arm_arm_"
SERIES = re.compile(r"(?:ugt_serving_|flink_taskmanager_)\w+")


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
    for counter in ARM_COUNTERS:  # the feedback_join job's, through Flink's reporter (its own labels not listed)
        out[FLINK_ARM_PREFIX + counter] = {"experiment", "arm"}
    return out


def dashboard_exprs() -> list[str]:
    """Every query of the dashboard (a row panel has none; a collapsed row keeps its panels inside)."""
    panels = json.loads(DASHBOARD.read_text())["panels"]
    panels = [*panels, *(inner for p in panels for inner in p.get("panels", []))]
    return [t["expr"] for panel in panels for t in panel.get("targets", [])]


def test_every_dashboard_query_uses_exported_series_and_labels():
    series = exported()
    exprs = dashboard_exprs()
    assert len(exprs) >= 8
    for expr in exprs:
        names = SERIES.findall(expr)
        for name in names:
            assert name in series, f"{name} in {expr!r} is not exported by serving/metrics.py or feedback_join"
        for label in re.findall(r"by \(([^)]*)\)", expr):
            for lab in (x.strip() for x in label.split(",")):
                if lab not in ("le", "job"):
                    assert any(lab in series[n] for n in names), f"label {lab!r} not on {names}"
        for name, selector in re.findall(r"(\w+)\{([^}]*)\}", expr):
            for lab in re.findall(r"(\w+)\s*=~?", selector):
                assert lab == "job" or lab in series[name], f"label {lab!r} in {expr!r} is not on {name}"


def test_the_experiment_row_plots_ctr_p99_and_failures_per_arm():
    panels = json.loads(DASHBOARD.read_text())["panels"]
    rows = [p for p in panels if p["type"] == "row" and "arm" in p["title"]]
    assert len(rows) == 1
    exprs = "\n".join(dashboard_exprs())
    assert f"{FLINK_ARM_PREFIX}clicked" in exprs and f"{FLINK_ARM_PREFIX}impressions" in exprs  # CTR
    assert f"{FLINK_ARM_PREFIX}watch_ms" in exprs and f"{FLINK_ARM_PREFIX}completions" in exprs  # watch, completion
    assert "histogram_quantile(0.99, sum by (le, experiment, arm) (rate(ugt_serving_arm_latency_seconds_bucket" in exprs
    assert 'ugt_serving_arm_requests_total{outcome="fallback"' in exprs
    assert 'ugt_serving_arm_requests_total{outcome="error"' in exprs
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    boxes = [(p["gridPos"]["x"], p["gridPos"]["y"]) for p in panels]
    assert len(boxes) == len(set(boxes))  # no panel drawn over another


def test_metric_names_follow_prometheus_conventions():
    for family in ServingMetrics().registry.collect():
        assert family.name.startswith("ugt_serving_")
        if family.type == "counter":
            assert any(s.name.endswith("_total") for s in family.samples) or not family.samples
        if family.type == "histogram" and "seconds" not in family.name:
            assert family.name.endswith("batch_size")
