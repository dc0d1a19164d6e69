"""merge_expositions: two processes' series scraped as one (engine: process)."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from serving.metrics import ServingMetrics, merge_expositions


def parsed(text: bytes) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text.decode()) for s in family.samples}


def test_counters_and_histograms_add_up_and_created_samples_are_dropped():
    http, engine = ServingMetrics(), ServingMetrics()
    http.requests.labels("/recommend", "200").inc(3)
    engine.requests.labels("/recommend", "200").inc(2)
    http.stage_seconds.labels("queue").observe(0.5)
    engine.stage_seconds.labels("queue").observe(0.003)
    engine.batch_size.observe(7)
    merged = parsed(merge_expositions(http.render(), engine.render()))
    assert merged[("ugt_serving_requests_total", (("endpoint", "/recommend"), ("status", "200")))] == 5
    assert merged[("ugt_serving_stage_seconds_count", (("stage", "queue"),))] == 2
    assert merged[("ugt_serving_stage_seconds_sum", (("stage", "queue"),))] == 0.503
    assert merged[("ugt_serving_stage_seconds_bucket", (("le", "0.005"), ("stage", "queue")))] == 1
    assert merged[("ugt_serving_stage_seconds_bucket", (("le", "+Inf"), ("stage", "queue")))] == 2
    assert merged[("ugt_serving_batch_size_count", ())] == 1
    assert not any(name.endswith("_created") for name, _ in merged)


def test_the_merge_is_valid_exposition_text_and_a_fixed_point():
    http = ServingMetrics()
    http.fallbacks.labels('odd "reason"\\with\nnewline').inc()
    once = merge_expositions(http.render())
    assert merge_expositions(once) == once
    families = {f.name: f.type for f in text_string_to_metric_families(once.decode())}
    assert families["ugt_serving_fallbacks"] == "counter" and families["ugt_serving_stage_seconds"] == "histogram"
    (sample,) = [s for f in text_string_to_metric_families(once.decode()) if f.name == "ugt_serving_fallbacks"
                 for s in f.samples]
    assert sample.labels == {"reason": 'odd "reason"\\with\nnewline'} and sample.value == 1


def test_an_engine_that_did_not_answer_leaves_the_http_series():
    http = ServingMetrics()
    http.errors.labels("unauthorized").inc()
    merged = parsed(merge_expositions(http.render(), b""))
    assert merged[("ugt_serving_errors_total", (("kind", "unauthorized"),))] == 1
