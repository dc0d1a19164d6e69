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


def test_observe_many_gives_what_observing_each_value_gives():
    from serving.metrics import observe_many

    values = [0.0, 0.0001, 0.00011, 0.003, 0.003, 0.7, 2.5, 7.0, 0.02]
    one_by_one, together = ServingMetrics(), ServingMetrics()
    for value in values:
        one_by_one.stage_seconds.labels("total").observe(value)
    observe_many(together.stage_seconds.labels("total"), values[:4])
    observe_many(together.stage_seconds.labels("total"), values[4:])
    observe_many(together.stage_seconds.labels("total"), [])
    want, got = parsed(one_by_one.render()), parsed(together.render())
    total = [key for key in want if key[0].startswith("ugt_serving_stage_seconds") and ("stage", "total") in key[1]]
    assert len(total) > 10
    for key in total:
        if key[0].endswith("_created"):
            continue
        assert abs(got[key] - want[key]) < 1e-12, key
