"""Per-arm serving latency and failures for `ugt experiment report --serving-url`, read from the service's /metrics.

Impressions carry no latency and a failed request has no impression, so the feedback_join job cannot measure
them; the service counts them itself, per arm (serving/metrics.py): ``ugt_serving_arm_latency_seconds{experiment,
arm}`` (a histogram of the answer's total seconds) and ``ugt_serving_arm_requests_total{experiment,arm,outcome}``
(outcome model, fallback or error). With ``--workers N`` one scrape already has every process's series added up.
The numbers are cumulative since the service started, not cut to the experiment's windows: a restarted service
starts again from zero, and a service that served before the experiment began has no arm series from then.
"""

from __future__ import annotations

import math
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

LATENCY = "ugt_serving_arm_latency_seconds"
REQUESTS = "ugt_serving_arm_requests_total"
OUTCOMES = ("model", "fallback", "error")


class ServingMetricsError(RuntimeError):
    """The service's /metrics could not be read or parsed; the message says which URL and why."""


def metrics_url(url: str) -> str:
    """``http://host:port`` or ``host:port`` means its ``/metrics``; a URL with a path is taken as it is."""
    if "://" not in url:
        url = f"http://{url}"
    parts = urllib.parse.urlsplit(url)
    return url if parts.path not in ("", "/") else urllib.parse.urlunsplit(parts._replace(path="/metrics"))


def fetch_exposition(url: str, timeout_s: float = 5.0) -> str:
    """The text exposition at ``url`` (see :func:`metrics_url`)."""
    target = metrics_url(url)
    try:
        with urllib.request.urlopen(target, timeout=timeout_s) as response:  # noqa: S310 (the user's own URL)
            return response.read().decode()
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise ServingMetricsError(f"serving metrics at {target} are unreachable ({exc}); is `ugt serve` up?") from exc


def histogram_quantile(q: float, buckets: Sequence[tuple[float, float]]) -> float:
    """Prometheus' histogram_quantile over cumulative ``(upper bound, count)`` buckets (``inf`` last): linear
    within the bucket the rank falls in; in the +Inf bucket, the highest finite bound; nan with no observations."""
    ordered = sorted(buckets)
    if not ordered or ordered[-1][1] <= 0:
        return math.nan
    rank = q * ordered[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in ordered:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (count - lower_count)
        lower_bound, lower_count = bound, count
    return lower_bound


def arm_serving_metrics(text: str, experiment: str, quantile: float = 0.99) -> dict[str, dict[str, Any]]:
    """Per arm of ``experiment``: requests by outcome, their total, fallback and error rates (of requests) and the
    latency quantile in seconds (nan before the first answer). Arms in the order the exposition lists them."""
    buckets: dict[str, list[tuple[float, float]]] = {}
    counts: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("experiment") != experiment:
                continue
            arm = sample.labels.get("arm", "")
            if sample.name == f"{LATENCY}_bucket":
                buckets.setdefault(arm, []).append((float(sample.labels["le"]), sample.value))
            elif sample.name == REQUESTS:
                counts.setdefault(arm, dict.fromkeys(OUTCOMES, 0.0))
                counts[arm][sample.labels.get("outcome", "")] = sample.value
    out: dict[str, dict[str, Any]] = {}
    for arm in dict.fromkeys([*counts, *buckets]):
        by_outcome = {o: int((counts.get(arm) or {}).get(o, 0)) for o in OUTCOMES}
        total = sum(by_outcome.values())
        out[arm] = {
            "requests": total,
            **by_outcome,
            "fallback_rate": by_outcome["fallback"] / total if total else math.nan,
            "error_rate": by_outcome["error"] / total if total else math.nan,
            f"p{100 * quantile:g}_s": histogram_quantile(quantile, buckets.get(arm, [])),
        }
    return out


def format_serving(serving: Mapping[str, Any] | None, arm_order: Sequence[str]) -> list[str]:
    """The report's serving lines: one per arm (config / report order first), or how to get them."""
    if serving is None:
        return ["serving p99 and errors per arm: not read (pass --serving-url http://<host>:<port>, the service's "
                "/metrics; impressions carry neither)"]
    arms: Mapping[str, Mapping[str, Any]] = serving["arms"]
    if not arms:
        return [f"serving ({serving['url']}): no per-arm series for this experiment (not in that service's config?)"]
    lines = [f"serving per arm ({serving['url']}, cumulative since the service started):"]
    for arm in dict.fromkeys([*(a for a in arm_order if a in arms), *arms]):
        m = arms[arm]
        p99 = m["p99_s"]
        latency = "n/a" if p99 is None or math.isnan(p99) else f"{1000 * p99:.1f} ms"
        lines.append(f"  {arm}: {m['requests']} requests, p99 {latency}, fallback {_pct(m['fallback_rate'])} "
                     f"({m['fallback']}), errors {_pct(m['error_rate'])} ({m['error']})")
    return lines


def _pct(x: float | None) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{100 * x:.2f}%"
