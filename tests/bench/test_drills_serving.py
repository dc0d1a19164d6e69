"""ServingLoad.summary: which answers count as the failure's fallbacks, and where their window lies (pure logic)."""

from __future__ import annotations

from bench.drills_serving import Asked, ServingLoad
from infra.settings import Settings


def load_with(asked: list[Asked]) -> ServingLoad:
    load = ServingLoad(Settings(), "dom", ["a", "b"], rate=10.0)
    load.asked = asked
    return load


def test_fallbacks_of_the_failure_are_counted_and_placed_against_the_kill() -> None:
    kill = 100.0
    summary = load_with([
        Asked(90.0, "a", 200, True, "unknown_user"),  # not streamed yet: the stream's progress, not the failure
        Asked(91.0, "a", 200, False),
        Asked(92.0, "b", 200, False),
        Asked(99.5, "a", 200, True, "state_unavailable", done=100.5),  # in flight at the kill
        Asked(102.0, "b", 200, True, "unknown_user"),  # b was known: its state went missing
        Asked(103.0, "a", None),
        Asked(104.0, "b", 503),
        Asked(105.0, "a", 422),
        Asked(109.0, "a", 200, True, "timeout"),
        Asked(112.0, "a", 200, False),
        Asked(113.0, "b", 200, False),
    ]).summary(kill, failover_s=8.0)
    assert summary["fallback_answers"] == 3
    assert summary["fallback_reasons"] == {"state_unavailable": 1, "unknown_user": 1, "timeout": 1}
    assert summary["fallback_window_s"] == [-0.5, 9.0]  # by when each call was sent
    assert summary["fallback_answered_window_s"] == [0.5, 9.0]  # by when its answer came back
    assert summary["fallback_answered_by_reason_s"] == {"state_unavailable": [0.5, 0.5], "unknown_user": [2.0, 2.0],
                                                         "timeout": [9.0, 9.0]}
    assert summary["unknown_user_not_yet_streamed"] == 1
    assert (summary["http_5xx"], summary["http_4xx"], summary["no_answer"]) == (1, 1, 1)
    assert summary["serving_answers_before_kill"] == 4
    assert summary["serving_model_answers"] == 4
    assert summary["model_again_s"] == 12.0
    assert summary["model_answers_after_window"] == 2


def test_no_fallbacks_means_no_window() -> None:
    summary = load_with([Asked(99.0, "a", 200, False), Asked(101.0, "a", 200, False)]).summary(100.0, 5.0)
    assert (summary["fallback_answers"], summary["fallback_window_s"], summary["model_again_s"]) == (0, None, None)
    assert summary["fallback_answered_window_s"] is None
    assert summary["model_answers_after_window"] == 0
