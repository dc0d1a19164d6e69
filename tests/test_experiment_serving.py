"""ugt/experiment_serving.py: per-arm serving p99 and failure rates from a /metrics exposition, and the report's
--serving-url (a real local HTTP server serving ServingMetrics' own exposition)."""

from __future__ import annotations

import argparse
import json
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from test_experiment_report import simulated_rows

from serving.metrics import ServingMetrics, merge_expositions
from ugt import experiment_cli
from ugt.experiment_serving import arm_serving_metrics, histogram_quantile, metrics_url


def test_histogram_quantile_interpolates_like_prometheus():
    buckets = [(0.01, 50.0), (0.02, 90.0), (0.05, 100.0), (math.inf, 100.0)]
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.01)
    assert histogram_quantile(0.7, buckets) == pytest.approx(0.015)  # rank 70: halfway through (0.01, 0.02]
    assert histogram_quantile(0.99, buckets) == pytest.approx(0.02 + 0.03 * 9 / 10)
    assert histogram_quantile(0.25, buckets) == pytest.approx(0.005)  # the first bucket starts at 0
    assert histogram_quantile(0.99, [(0.1, 1.0), (math.inf, 10.0)]) == 0.1  # in +Inf: the highest finite bound
    assert math.isnan(histogram_quantile(0.99, [(0.1, 0.0), (math.inf, 0.0)]))
    assert math.isnan(histogram_quantile(0.99, []))


def test_metrics_url_points_at_metrics_unless_a_path_is_given():
    assert metrics_url("localhost:8000") == "http://localhost:8000/metrics"
    assert metrics_url("http://h:1/") == "http://h:1/metrics"
    assert metrics_url("http://h:1/custom/metrics") == "http://h:1/custom/metrics"


def observe(metrics: ServingMetrics, arm: str, outcomes: dict[str, int], seconds: float) -> None:
    metrics.watch_arms([("exp", "control"), ("exp", "ugt")])
    for outcome, n in outcomes.items():
        for _ in range(n):
            metrics.arm_requests.labels("exp", arm, outcome).inc()
            if outcome != "error":
                metrics.arm_latency.labels("exp", arm).observe(seconds)


def test_two_workers_expositions_add_up_per_arm():
    """`--workers N`: the engine sums every process's series (merge_expositions); the per-arm numbers of the merged
    scrape equal those of one process that saw every request."""
    first, second, whole = ServingMetrics(), ServingMetrics(), ServingMetrics()
    observe(first, "control", {"model": 90, "fallback": 5}, 0.003)
    observe(second, "control", {"model": 4, "error": 1}, 0.3)
    observe(second, "ugt", {"model": 30, "fallback": 10}, 0.015)
    for metrics, arm, outcomes, seconds in ((whole, "control", {"model": 90, "fallback": 5}, 0.003),
                                            (whole, "control", {"model": 4, "error": 1}, 0.3),
                                            (whole, "ugt", {"model": 30, "fallback": 10}, 0.015)):
        observe(metrics, arm, outcomes, seconds)
    merged = arm_serving_metrics(merge_expositions(first.render(), second.render()).decode(), "exp")
    assert merged == arm_serving_metrics(whole.render().decode(), "exp")
    control, ugt = merged["control"], merged["ugt"]
    assert (control["requests"], control["model"], control["fallback"], control["error"]) == (100, 94, 5, 1)
    assert control["fallback_rate"] == pytest.approx(0.05) and control["error_rate"] == pytest.approx(0.01)
    assert 0.25 < control["p99_s"] <= 0.5  # 4 of 99 answers took 0.3 s: the p99 is in their bucket
    assert ugt["fallback_rate"] == pytest.approx(0.25) and 0.01 < ugt["p99_s"] <= 0.02
    assert arm_serving_metrics(merge_expositions(first.render()).decode(), "other") == {}


def test_arms_without_requests_are_listed_with_zeros():
    metrics = ServingMetrics()
    metrics.watch_arms([("exp", "a")])
    got = arm_serving_metrics(metrics.render().decode(), "exp")["a"]
    assert got["requests"] == 0 and math.isnan(got["p99_s"]) and math.isnan(got["error_rate"])


@pytest.fixture
def serving_url():
    """A real HTTP server answering GET /metrics with a ServingMetrics exposition."""
    metrics = ServingMetrics()
    observe(metrics, "control", {"model": 196, "fallback": 4}, 0.004)
    observe(metrics, "treatment", {"model": 180, "error": 20}, 0.008)
    body = metrics.render()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            self.send_response(200 if self.path == "/metrics" else 404)
            self.end_headers()
            self.wfile.write(body if self.path == "/metrics" else b"no")

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    experiment_cli.add_arguments(parser)
    return parser.parse_args(["report", "exp", "--shares", "control=0.5,treatment=0.5", *argv])


def test_report_shows_serving_p99_and_failures_per_arm(monkeypatch, capsys, serving_url):
    rows = simulated_rows(200, {"control": 0.1, "treatment": 0.2})
    monkeypatch.setattr(experiment_cli, "rows_from_redis", lambda url, name: rows)
    assert experiment_cli.run(parse(["--serving-url", serving_url])) == 0
    out = capsys.readouterr().out
    assert f"serving per arm ({serving_url}/metrics, cumulative since the service started):" in out
    assert "  control: 200 requests, p99 5.0 ms, fallback 2.00% (4), errors 0.00% (0)" in out
    assert "  treatment: 200 requests, p99 10.0 ms, fallback 0.00% (0), errors 10.00% (20)" in out
    assert experiment_cli.run(parse(["--serving-url", serving_url, "--json"])) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["serving"]["arms"]["treatment"]["error"] == 20
    assert data["serving"]["arms"]["control"]["p99_s"] == pytest.approx(0.002 + 0.003 * 198 / 200)
    assert experiment_cli.run(parse([])) == 0
    assert "serving p99 and errors per arm: not read (pass --serving-url" in capsys.readouterr().out
    assert experiment_cli.run(parse(["--json"])) == 0
    assert json.loads(capsys.readouterr().out)["serving"] is None


def test_report_says_when_the_serving_url_is_wrong(monkeypatch, capsys, serving_url):
    monkeypatch.setattr(experiment_cli, "rows_from_redis", lambda url, name: [])
    assert experiment_cli.run(parse(["--serving-url", serving_url + "/nothing"])) == 1
    assert f"serving metrics at {serving_url}/nothing are unreachable" in capsys.readouterr().err


def test_the_command_bench_ab_sim_prints_is_one_the_cli_accepts():
    from bench.ab_sim import report_command

    command = report_command("ab-1234", "http://127.0.0.1:8000")
    assert command[:3] == ["ugt", "experiment", "report"]
    parser = argparse.ArgumentParser()
    experiment_cli.add_arguments(parser)
    args = parser.parse_args(command[2:])
    assert (args.name, args.shares, args.serving_url) == ("ab-1234", "control=0.5,treatment=0.5", "http://127.0.0.1:8000")
