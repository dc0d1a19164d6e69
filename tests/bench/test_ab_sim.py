"""The A/B simulator's pure parts: the click models, the click-to-metric delays, the users' past/future split."""

from __future__ import annotations

import random

from bench.ab_join import click_delays, percentile, synthetic_backlog
from bench.ab_sim import WATCH_LENGTH_S, click_events, planted_position, relevance_position
from bench.ab_users import write_past_dataset


def answer(items: list[str]) -> dict:
    return {"user_id": "u", "domain": "movie", "items": [{"item_id": i} for i in items]}


def test_relevance_clicks_only_future_items_when_the_base_rate_is_zero() -> None:
    rng = random.Random(1)
    shown = answer([str(i) for i in range(10)])
    positions = [relevance_position(shown, frozenset({"3"}), 1.0, 0.0, rng) for _ in range(2000)]
    assert set(positions) == {None, 3}
    # position 3 is examined with probability 1/log2(5) = 0.43
    assert 0.38 < positions.count(3) / len(positions) < 0.48


def test_relevance_cascade_stops_at_the_first_click() -> None:
    rng = random.Random(2)
    shown = answer(["a", "b", "c"])
    assert {relevance_position(shown, frozenset({"a", "b", "c"}), 1.0, 0.0, rng) for _ in range(50)} == {0}
    assert relevance_position(shown, frozenset(), 0.5, 0.0, rng) is None


def test_planted_click_rate_and_position_bias() -> None:
    rng = random.Random(3)
    shown = answer([str(i) for i in range(10)])
    positions = [planted_position(shown, 0.3, rng) for _ in range(5000)]
    clicked = [p for p in positions if p is not None]
    assert 0.27 < len(clicked) / len(positions) < 0.33
    assert clicked.count(0) > clicked.count(9) * 4
    assert planted_position(answer([]), 1.0, rng) is None


def test_click_events_carry_the_click_and_its_time() -> None:
    rng = random.Random(4)
    events, clicked_at = click_events(answer(["x", "y"]), 1, 1.0, 1.0, rng)
    clicks = [e for e in events if e["action"] == "CLICK"]
    assert [e["item_id"] for e in clicks] == ["y"] and clicks[0]["event_time"] == clicked_at
    assert any(e["action"] == "PURCHASE" and e["event_time"] > clicked_at for e in events)
    [view] = [e for e in events if e["action"] == "VIEW"]  # watched to the end (p_finish 1), its length in context
    assert view["item_id"] == "y" and view["event_time"] > clicked_at
    assert view["duration_s"] == WATCH_LENGTH_S and float(view["context"]["item_length_s"]) == WATCH_LENGTH_S
    events, clicked_at = click_events(answer(["x"]), None, 1.0, 1.0, rng)
    assert clicked_at is None and all(e["action"] == "SKIP" for e in events)


def test_an_unfinished_view_is_a_whole_number_of_seconds_between_5_and_60_percent() -> None:
    rng = random.Random(5)
    for _ in range(50):
        events, _ = click_events(answer(["x"]), 0, 0.0, 0.0, rng)
        [view] = [e for e in events if e["action"] == "VIEW"]
        assert 0.05 * WATCH_LENGTH_S <= view["duration_s"] <= 0.6 * WATCH_LENGTH_S
        assert view["duration_s"] == int(view["duration_s"])  # an Avro float holds it exactly


def test_click_delays_leave_out_flushed_and_unseen_windows() -> None:
    first_seen = {("a", 0): 40_000, ("a", 15_000): 55_000, ("b", 30_000): 90_000}
    clicks = [("a", 0, 2_000), ("a", 0, 14_000), ("a", 15_000, 16_000), ("b", 30_000, 31_000), ("b", 45_000, 46_000)]
    got = click_delays(clicks, first_seen, 15_000, closed_at_ms=80_000)
    assert got["clicks_measured"] == 3 and got["clicks_in_flushed_windows"] == 1
    assert got["clicks_window_never_seen"] == 1
    assert got["min_s"] == 26.0 and got["max_s"] == 39.0 and got["p50_s"] == 38.0


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(101)]
    assert percentile(values, 0.99) == 99.0 and percentile(values, 0.5) == 50.0 and percentile([7.0], 0.99) == 7.0


def test_synthetic_backlog_is_two_arms_in_time_order() -> None:
    imps, events, experiment = synthetic_backlog("r", 400, 0)
    assert len(imps) == 400 and {i["arm"] for i in imps} == {"a", "b"} and experiment == "fjbench-r"
    assert all(a["served_at"] <= b["served_at"] for a, b in zip(imps, imps[1:], strict=False))
    assert imps[-1]["served_at"] - imps[0]["served_at"] < 5_000
    served = {i["user_id"]: i for i in imps}
    assert 20 < len(events) < 70 and all(e["user_id"] in served for e in events)


def test_past_dataset_is_a_generic_folder(tmp_path) -> None:
    from contracts.datasets import load_generic

    folder = write_past_dataset({"1": [("10", 4.0, 100), ("11", 3.0, 200)], "2": [("10", 5.0, 150)]}, tmp_path / "d")
    data = load_generic(folder)
    assert len(data.ratings) == 3 and set(data.ratings["user_id"]) == {"1", "2"}
