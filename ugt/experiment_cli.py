"""`ugt experiment report NAME`: an experiment's per-arm readout from the feedback_join job's metrics.

    ugt experiment report ugt_vs_popularity                       # from Redis (ugt:exp:<name>:...)
    ugt experiment report ugt_vs_popularity --source kafka --json # from the experiments.metrics topic, as JSON
    ugt experiment report ab --config serving/configs/ab.yaml --control control
    ugt experiment report ab --serving-url http://localhost:8000  # plus per-arm serving p99 and failures

Per arm: impressions, users, CTR (an interaction within the attribution window) with its user-clustered interval,
CTR@k, conversion, item CTR, position-wise CTR, catalog coverage, the fallback rate, watch time per impression and
the completion rate (user-clustered intervals too); per arm against the control (default: the first arm of the
config): the difference and relative lift of CTR, watch time and completion with intervals and two-sided p-values;
and a sample-ratio-mismatch check of users per arm against the shares of the serving config; with --serving-url,
each arm's serving p99 and fallback / error rates from the service's /metrics (ugt/experiment_serving.py).
Statistics: ugt/experiment_stats.py; the metrics: docs/EXPERIMENTS.md.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Mapping
from typing import Any

from infra.settings import get_settings


class ReportError(RuntimeError):
    """Nothing to report (no such experiment, unreachable store); the message says what to do."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="<action>", required=True)
    rep = sub.add_parser("report", help="per-arm metrics, intervals, significance, lift and a sample-ratio check",
                         description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    rep.add_argument("name", help="the experiment's name (as in the serving config)")
    rep.add_argument("--source", choices=("redis", "kafka"), default="redis",
                     help="read the per-window metrics from Redis hashes or the metrics topic (default: %(default)s)")
    rep.add_argument("--redis", default=None, help="Redis URL (default: Settings.redis_url)")
    rep.add_argument("--bootstrap", default=None, help="Kafka bootstrap servers (default: Settings.kafka_bootstrap)")
    rep.add_argument("--topic", default=None, help="metrics topic (default: Settings.topics.experiment_metrics)")
    rep.add_argument("--config", default=None,
                     help="serving config naming the experiment's arms and shares (default: the service's default)")
    rep.add_argument("--shares", default="",
                     help="arm=share,... instead of the config's (e.g. A=0.5,B=0.5); '' = from --config")
    rep.add_argument("--control", default=None, help="the arm others are compared with (default: the first arm)")
    rep.add_argument("--confidence", type=float, default=0.95, help="interval level (default: %(default)s)")
    rep.add_argument("--serving-url", default=None,
                     help="the service's Prometheus /metrics (http://host:port or a full URL) for each arm's serving "
                          "p99 and fallback / error rates (default: not read, the report says so)")
    rep.add_argument("--json", action="store_true", help="print the report as JSON (for machines)")


def rows_from_redis(url: str, experiment: str) -> list[dict[str, Any]]:
    import redis

    from infra.redis_client import redis_from_url
    from jobs.feedback_join_logic import metrics_from_redis

    client = redis_from_url(url, socket_timeout=5)
    try:
        return metrics_from_redis(client, experiment)
    except redis.RedisError as exc:
        raise ReportError(f"Redis at {url} is unreachable ({exc}); is the stack up? `ugt stack status`") from exc
    finally:
        client.close()


def rows_from_kafka(bootstrap: str, topic: str, experiment: str, timeout_s: float = 10.0) -> list[dict[str, Any]]:
    """Every row of the topic for the experiment, the last one per (arm, window) (a replayed job writes again)."""
    import time

    from confluent_kafka import Consumer, KafkaException, TopicPartition

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "ugt-experiment-report",
                         "enable.auto.commit": False, "auto.offset.reset": "earliest"})
    try:
        meta = consumer.list_topics(topic, timeout=timeout_s).topics.get(topic)
        if meta is None or meta.error is not None:
            raise ReportError(f"no topic {topic} at {bootstrap}; has the feedback_join job run?")
        parts = [TopicPartition(topic, p, 0) for p in meta.partitions]
        ends = {p.partition: consumer.get_watermark_offsets(p, timeout=timeout_s)[1] for p in parts}
        consumer.assign(parts)
        rows: dict[tuple[str, int], dict[str, Any]] = {}
        done = {p for p, end in ends.items() if end == 0}
        deadline = time.monotonic() + timeout_s
        while len(done) < len(ends) and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None or msg.error():
                continue
            row = json.loads(msg.value())
            if row.get("experiment") == experiment:
                rows[(row["arm"], row["window_start"])] = row
            if msg.offset() + 1 >= ends[msg.partition()]:
                done.add(msg.partition())
        return list(rows.values())
    except KafkaException as exc:
        raise ReportError(f"Kafka at {bootstrap} is unreachable ({exc}); is the stack up?") from exc
    finally:
        consumer.close()


def configured_arms(config_path: str | None, experiment: str, shares_text: str) -> tuple[list[str], dict[str, float]]:
    """Arm order and shares: --shares when given, else the serving config's experiment (empty when absent)."""
    if shares_text:
        pairs = [p.split("=", 1) for p in shares_text.split(",") if p.strip()]
        try:
            shares = {name.strip(): float(value) for name, value in pairs}
        except ValueError as exc:
            raise ReportError(f"--shares wants arm=share,... got {shares_text!r}") from exc
        return list(shares), shares
    from serving.config import ConfigError, load_config

    try:
        config = load_config(config_path) if config_path else load_config()
    except (ConfigError, OSError) as exc:
        if config_path:
            raise ReportError(f"serving config: {exc}") from exc
        print(f"ugt experiment: the default serving config does not load ({exc}); no shares for the sample-ratio "
              "check (pass --config or --shares)", file=sys.stderr)
        return [], {}
    for exp in config.experiments:
        if exp.name == experiment:
            return [a.name for a in exp.arms], {a.name: a.share for a in exp.arms}
    return [], {}


def _pct(x: float) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{100 * x:.2f}%"


def _interval(pair) -> str:
    low, high = pair
    return f"[{_pct(low)}, {_pct(high)}]"


def format_report(name: str, result: Mapping[str, Any]) -> str:
    from ugt.experiment_serving import format_serving

    serving = format_serving(result.get("serving"), [arm["arm"] for arm in result["arms"]])
    if not result["arms"]:
        return "\n".join([f"experiment {name}: no metrics yet", *serving])
    return "\n".join([*_stream_lines(name, result), *serving])


def _stream_lines(name: str, result: Mapping[str, Any]) -> list[str]:
    """The feedback_join part: the per-arm table, position CTR and the sample-ratio check."""
    from tabulate import tabulate

    level = f"{100 * result['confidence']:g}%"
    table = []
    for arm in result["arms"]:
        vs = arm.get("vs_control")
        ctr_at = "  ".join(f"@{k} {_pct(v['ctr'])}" for k, v in arm["ctr_at"].items())
        table.append([
            arm["arm"] + (" (control)" if arm["arm"] == result["control"] else ""), arm["impressions"], arm["users"],
            f"{_pct(arm['ctr'])} {_interval(arm['ctr_ci'])}", ctr_at, _pct(arm["conversion_rate"]),
            arm["items_covered"], _pct(arm["fallback_rate"]),
            "" if vs is None else f"{_pct(vs['lift'])} [{_pct(vs['lift_ci_low'])}, {_pct(vs['lift_ci_high'])}]",
            "" if vs is None else f"{vs['p_value']:.3g}",
        ])
    lines = [f"experiment {name}: {len(result['arms'])} arms, {level} intervals (CTR: user-clustered; CTR@k: per "
             "impression)", tabulate(table, headers=["arm", "impressions", "users", "CTR", "CTR@k", "conversion",
                                                     "items covered", "fallback", "lift vs control", "p"])]
    for arm in result["arms"]:
        pos = " ".join(_pct(x) for x in arm["position_ctr"][:10])
        lines.append(f"position CTR {arm['arm']}: {pos}")
    lines += _watch_lines(result["arms"])
    srm = result.get("srm")
    if srm is None:
        lines.append("sample ratio: no configured shares (pass --config or --shares)")
    elif srm["expected"]:
        verdict = "MISMATCH: the split is broken, do not trust the results" if srm["mismatch"] else "ok"
        expected = ", ".join(f"{a} {o} vs {e:.0f}" for a, o, e in zip(srm["arms"], srm["observed"], srm["expected"],
                                                                      strict=True))
        lines.append(f"sample ratio (users): {expected}; chi2 {srm['chi2']:.2f}, p {srm['p_value']:.3g}: {verdict}")
    return lines


def _seconds(x: float | None) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{x:.1f} s"


def _versus(vs: Mapping[str, float] | None) -> str:
    if vs is None:
        return ""
    return f", lift {_pct(vs['lift'])} [{_pct(vs['lift_ci_low'])}, {_pct(vs['lift_ci_high'])}] p {vs['p_value']:.3g}"


def _watch_lines(arms: list[Mapping[str, Any]]) -> list[str]:
    """Watch time per impression and completion rate per arm (user-clustered intervals), with lifts."""
    lines = []
    for arm in arms:
        low, high = arm.get("watch_s_ci", (math.nan, math.nan))
        lines.append(f"watch time {arm['arm']}: {_seconds(arm.get('watch_s_per_impression'))} per impression "
                     f"[{_seconds(low)}, {_seconds(high)}] ({arm.get('watch_s', 0) / 3600:.1f} h over "
                     f"{arm.get('watched', 0)} watched impressions){_versus(arm.get('watch_vs_control'))}")
        lines.append(f"completion {arm['arm']}: {_pct(arm.get('completion_rate'))} "
                     f"{_interval(arm.get('completion_ci', (math.nan, math.nan)))} ({arm.get('completions', 0)} "
                     f"completed impressions){_versus(arm.get('completion_vs_control'))}")
    return lines


def _plain(value: Any) -> Any:
    """JSON-safe: tuples as lists, nan and inf as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def serving_of(url: str | None, experiment: str) -> dict[str, Any] | None:
    """Per-arm serving metrics from ``url`` (None when not asked for); ReportError when unreadable."""
    from ugt.experiment_serving import ServingMetricsError, arm_serving_metrics, fetch_exposition, metrics_url

    if not url:
        return None
    try:
        return {"url": metrics_url(url), "arms": arm_serving_metrics(fetch_exposition(url), experiment)}
    except ServingMetricsError as exc:
        raise ReportError(str(exc)) from exc
    except ValueError as exc:  # the parser's: not a Prometheus exposition
        raise ReportError(f"{metrics_url(url)} is not a Prometheus exposition ({exc})") from exc


def run(args: argparse.Namespace) -> int:
    from ugt.experiment_stats import report

    settings = get_settings()
    if not 0 < args.confidence < 1:
        print("ugt experiment: --confidence must be in (0, 1)", file=sys.stderr)
        return 2
    try:
        order, shares = configured_arms(args.config, args.name, args.shares)
        if args.source == "redis":
            rows = rows_from_redis(args.redis or settings.redis_url, args.name)
        else:
            rows = rows_from_kafka(args.bootstrap or settings.kafka_bootstrap,
                                   args.topic or settings.topics.experiment_metrics, args.name)
        serving = serving_of(args.serving_url, args.name)
    except ReportError as exc:
        print(f"ugt experiment: {exc}", file=sys.stderr)
        return 1
    result = {**report(rows, order, shares, args.control, args.confidence), "serving": serving}
    if args.json:
        print(json.dumps(_plain({"experiment": args.name, **result}), indent=2))
    else:
        print(format_report(args.name, result))
    return 0 if result["arms"] else 1
