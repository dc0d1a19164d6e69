"""jobs/feedback_join_logic.py: attribution windows, last touch, late records, duplicates, window metrics."""

from __future__ import annotations

import heapq
import random

import pytest

from jobs.feedback_join_logic import (
    ARM_COUNTERS,
    DUPLICATE,
    LATE,
    NO_EXPERIMENT,
    NO_WATERMARK,
    PENDING,
    ArmAggregator,
    ArmState,
    Feedback,
    FeedbackJoiner,
    Impression,
    JoinConfig,
    UserJoinState,
    offline_metrics,
    redis_fields,
    row_from_redis,
)

MIN = 60_000
CONFIG = JoinConfig(attribution_ms=10 * MIN, metric_window_ms=5 * MIN, ctr_ks=(1, 3), max_positions=5)


def imp(request_id: str, at: int, items=("a", "b", "c"), user="u1", arm="B", experiment="exp") -> Impression:
    return Impression(request_id, user, experiment, arm, at, tuple(items))


def click(event_id: str, item: str, at: int, action: str = "CLICK", user: str = "u1",
          duration_s: float | None = None, length_s: float | None = None) -> Feedback:
    return Feedback(event_id, user, item, action, at, duration_s, length_s)


def run(joiner: FeedbackJoiner, state: UserJoinState, records, until: int):
    """Records in arrival order with the watermark never passing them; then the watermark jumps to `until`."""
    for r in records:
        if isinstance(r, Impression):
            joiner.on_impression(state, r, NO_WATERMARK)
        else:
            joiner.on_event(state, r, NO_WATERMARK)
    return joiner.on_timer(state, until)


def test_click_inside_the_window_is_attributed_at_its_position_and_outside_is_not() -> None:
    joiner, state = FeedbackJoiner(CONFIG), UserJoinState()
    t0 = 100 * MIN
    outcomes, attributed = run(joiner, state, [
        imp("r1", t0),
        click("e1", "b", t0 + 10 * MIN - 1),  # last ms of [served_at, served_at + window)
        click("e2", "c", t0 + 10 * MIN),  # first ms after it
        click("e3", "a", t0 - 1),  # before the impression was served
    ], t0 + 20 * MIN)
    assert attributed == 1
    [o] = outcomes
    assert o.clicked == (1,) and not o.converted and o.new_user
    assert state.open == {} and state.pending == []


def test_last_touch_goes_to_the_newest_impression_that_showed_the_item() -> None:
    joiner, state = FeedbackJoiner(CONFIG), UserJoinState()
    outcomes, _ = run(joiner, state, [
        imp("r1", 0, items=("x", "y")), imp("r2", 2 * MIN, items=("y", "x")), imp("r3", 3 * MIN, items=("z",)),
        click("e1", "x", 4 * MIN, action="PURCHASE"),
    ], 60 * MIN)
    by_request = {o.served_at: o for o in outcomes}
    assert by_request[2 * MIN].clicked == (1,) and by_request[2 * MIN].converted
    assert by_request[0].clicked == () and by_request[3 * MIN].clicked == ()


def test_skips_are_not_interactions_and_conversions_follow_the_config() -> None:
    joiner, state = FeedbackJoiner(JoinConfig(attribution_ms=MIN, conversions=frozenset({"LIKE"}))), UserJoinState()
    outcomes, attributed = run(joiner, state, [imp("r1", 0), click("e1", "a", 1, "SKIP"), click("e2", "b", 2, "LIKE")],
                               10 * MIN)
    assert attributed == 1 and outcomes[0].clicked == (1,) and outcomes[0].converted


def test_late_records_are_reported_not_joined_and_a_redelivery_is_a_duplicate() -> None:
    joiner, state = FeedbackJoiner(CONFIG), UserJoinState()
    assert joiner.on_impression(state, imp("r1", 0), NO_WATERMARK) == (PENDING, 10 * MIN)
    assert joiner.on_event(state, click("e1", "a", MIN), NO_WATERMARK) == (PENDING, MIN)
    outcomes, _ = joiner.on_timer(state, 2 * MIN)
    assert outcomes == []  # the impression's window is still open
    assert joiner.on_event(state, click("e2", "b", 2 * MIN), 2 * MIN) == (LATE, None)  # at the watermark: late
    assert joiner.on_event(state, click("e2", "b", 2 * MIN), 2 * MIN) == (DUPLICATE, None)  # counted once
    assert joiner.on_impression(state, imp("r9", MIN), 2 * MIN) == (LATE, None)
    assert joiner.on_event(state, click("e3", "c", 3 * MIN), 2 * MIN) == (PENDING, 3 * MIN)
    outcomes, attributed = joiner.on_timer(state, 10 * MIN)
    assert attributed == 1 and [o.clicked for o in outcomes] == [(0, 2)]


def test_duplicate_impressions_and_events_count_once() -> None:
    joiner, state = FeedbackJoiner(CONFIG), UserJoinState()
    records = [imp("r1", 0), imp("r1", 0), click("e1", "a", 5), click("e1", "a", 5)]
    statuses = [joiner.on_impression(state, r, NO_WATERMARK) if isinstance(r, Impression)
                else joiner.on_event(state, r, NO_WATERMARK) for r in records]
    assert [s for s, _ in statuses] == [PENDING, DUPLICATE, PENDING, DUPLICATE]
    outcomes, attributed = joiner.on_timer(state, 20 * MIN)
    assert len(outcomes) == 1 and attributed == 1


def test_dedup_ids_expire_after_the_horizon() -> None:
    joiner, state = FeedbackJoiner(JoinConfig(attribution_ms=MIN, dedup_horizon_ms=5 * MIN)), UserJoinState()
    run(joiner, state, [imp("r1", 0), click("e1", "a", 1)], 2 * MIN)
    assert "e1" in state.seen_events
    joiner.on_timer(state, 6 * MIN)
    assert state.seen_events == {} and state.seen_requests == {} and not state.open


def test_impressions_outside_every_experiment_are_skipped() -> None:
    joiner, state = FeedbackJoiner(CONFIG), UserJoinState()
    assert joiner.on_impression(state, imp("r1", 0, arm=None), NO_WATERMARK) == (NO_EXPERIMENT, None)
    assert state.open == {}


def test_user_sums_telescope_to_each_users_squares() -> None:
    """Summed deltas per arm = sum over users of n², c², n·c: the delta method's inputs."""
    joiner = FeedbackJoiner(CONFIG)
    rng = random.Random(7)
    want = {"n2": 0, "c2": 0, "nc": 0}
    got = {"n2": 0, "c2": 0, "nc": 0}
    for u in range(30):
        state, records, n, c = UserJoinState(), [], rng.randint(1, 6), 0
        for i in range(n):
            records.append(imp(f"{u}-{i}", i * 20 * MIN, user=str(u)))
            if rng.random() < 0.4:
                records.append(click(f"{u}-{i}-c", "b", i * 20 * MIN + 1, user=str(u)))
                c += 1
        outcomes, _ = run(joiner, state, records, 10**9)
        assert sum(o.new_user for o in outcomes) == 1
        for key, value in (("n2", n * n), ("c2", c * c), ("nc", n * c)):
            want[key] += value
        got["n2"] += sum(o.d_n2 for o in outcomes)
        got["c2"] += sum(o.d_c2 for o in outcomes)
        got["nc"] += sum(o.d_nc for o in outcomes)
    assert got == want


def test_completion_is_measured_when_the_event_can_tell_else_by_its_action() -> None:
    config = JoinConfig(completion_share=0.9, completion_actions=frozenset({"RATE"}))
    assert config.completes(click("e", "a", 0, "VIEW", duration_s=90.0, length_s=100.0))  # 90 >= 0.9 * 100
    assert not config.completes(click("e", "a", 0, "VIEW", duration_s=89.9, length_s=100.0))
    # a rating with a measured short view did not finish the item; without a length its action decides
    assert not config.completes(click("e", "a", 0, "RATE", duration_s=10.0, length_s=100.0))
    assert config.completes(click("e", "a", 0, "RATE", duration_s=10.0))
    assert config.completes(click("e", "a", 0, "RATE", length_s=100.0))
    assert not config.completes(click("e", "a", 0, "VIEW", duration_s=5000.0))  # no length, not a completing action
    assert not JoinConfig(completion_actions=frozenset()).completes(click("e", "a", 0, "RATE"))
    with pytest.raises(ValueError, match="completion"):
        JoinConfig(completion_actions=frozenset({"FINISH"}))
    with pytest.raises(ValueError, match="completion_share"):
        JoinConfig(completion_share=0.0)


def test_watch_time_and_completion_of_an_impression() -> None:
    """Watch time sums the durations of the events attributed to the impression, in whole ms; skips, events
    outside the window and events of other impressions' items add nothing."""
    joiner, state = FeedbackJoiner(CONFIG), UserJoinState()
    outcomes, attributed = run(joiner, state, [
        imp("r1", 0, items=("a", "b", "c")),
        click("e1", "a", 1_000, "VIEW", duration_s=600.25, length_s=1000.0),  # 60 %: not complete
        click("e2", "b", 2_000, "VIEW", duration_s=95.0, length_s=100.0),  # complete
        click("e3", "c", 3_000, "SKIP", duration_s=4.0),  # not an interaction
        click("e4", "a", 10 * MIN, "VIEW", duration_s=50.0),  # after the attribution window
        click("e5", "z", 4_000, "VIEW", duration_s=70.0),  # an item it did not show
        imp("r2", 30 * MIN, items=("a",)),
        click("e6", "a", 30 * MIN + 1, "VIEW", duration_s=10.0, length_s=1000.0),
    ], 60 * MIN)
    assert attributed == 3
    first, second = sorted(outcomes, key=lambda o: o.served_at)
    assert (first.watch_ms, first.completed) == (695_250, True)
    assert (second.watch_ms, second.completed) == (10_000, False)
    [row_a, row_b] = sorted(offline_metrics([imp("r1", 0, items=("a", "b", "c")), imp("r2", 30 * MIN, items=("a",))],
                                            [click("e1", "a", 1_000, "VIEW", duration_s=600.25, length_s=1000.0),
                                             click("e2", "b", 2_000, "VIEW", duration_s=95.0, length_s=100.0),
                                             click("e6", "a", 30 * MIN + 1, "VIEW", duration_s=10.0)], CONFIG),
                            key=lambda r: r["window_start"])
    assert (row_a["watch_ms"], row_a["watched"], row_a["completions"]) == (695_250, 1, 1)
    assert row_a["watch_s"] == 695.25 and row_a["watch_s_per_impression"] == 695.25
    assert row_a["completion_rate"] == 1.0
    assert (row_b["watch_ms"], row_b["completions"], row_b["completion_rate"]) == (10_000, 0, 0.0)


def test_watch_and_completion_sums_telescope_to_each_users_squares() -> None:
    """Summed deltas per arm = sum over users of w², n·w, m², n·m (w watch ms, m completed impressions)."""
    joiner = FeedbackJoiner(CONFIG)
    rng = random.Random(11)
    want = {"w2": 0, "nw": 0, "m2": 0, "nm": 0}
    got = dict.fromkeys(want, 0)
    for u in range(30):
        state, records, n, w, m = UserJoinState(), [], rng.randint(1, 6), 0, 0
        for i in range(n):
            records.append(imp(f"{u}-{i}", i * 20 * MIN, user=str(u)))
            if rng.random() < 0.6:
                seconds = rng.choice([1.5, 40.0, 100.0])
                records.append(click(f"{u}-{i}-v", "b", i * 20 * MIN + 1, "VIEW", str(u), seconds, 100.0))
                w += round(seconds * 1000)
                m += seconds >= 90.0
        outcomes, _ = run(joiner, state, records, 10**9)
        for key, value in (("w2", w * w), ("nw", n * w), ("m2", m * m), ("nm", n * m)):
            want[key] += value
        for key in want:
            got[key] += sum(getattr(o, f"d_{key}") for o in outcomes)
    assert got == want


def test_older_state_without_watch_sums_still_closes() -> None:
    """A user's totals restored from a job version before watch time (2-tuples) and an arm window without the
    new sums: the join and the aggregation carry on from zeros."""
    joiner, state = FeedbackJoiner(CONFIG), UserJoinState(totals={("exp", "B"): (2, 1)})
    [o], _ = run(joiner, state, [imp("r1", 0), click("e1", "a", 1, "VIEW", duration_s=2.0)], 60 * MIN)
    assert (o.d_n2, o.d_w2, o.d_nw) == (5, 4_000_000, 6_000) and state.totals[("exp", "B")] == (3, 2, 2000, 0)
    aggregator, arm = ArmAggregator(CONFIG), ArmState()
    aggregator.on_outcome(arm, o, NO_WATERMARK)
    window = arm.windows[0]
    window.counts = {k: v for k, v in window.counts.items() if not k.startswith(("watch", "user_w", "user_m"))}
    aggregator.on_outcome(arm, o, NO_WATERMARK)
    assert window.counts["impressions"] == 2 and window.counts["watch_ms"] == 2000


def test_window_metrics_ctr_at_k_positions_and_coverage() -> None:
    impressions = [imp("r1", 0, items=("a", "b", "c", "d"), user="u1"),
                   imp("r2", MIN, items=("a", "e", "f", "g"), user="u2"),
                   imp("r3", 2 * MIN, items=("h",), user="u3"),
                   imp("r4", 5 * MIN, items=("a", "b"), user="u1")]  # next window
    events = [click("e1", "a", 10, user="u1"), click("e2", "f", MIN + 10, user="u2"),
              click("e3", "g", MIN + 20, "PURCHASE", user="u2")]
    rows = offline_metrics(impressions, events, CONFIG)
    first, second = sorted(rows, key=lambda r: r["window_start"])
    assert (first["window_start"], first["window_end"], second["window_start"]) == (0, 5 * MIN, 5 * MIN)
    assert first["impressions"] == 3 and first["users"] == 3 and first["clicked"] == 2
    assert first["clicked_at"] == {"1": 1, "3": 2} and first["ctr_at"]["1"] == pytest.approx(1 / 3)
    assert first["item_clicks"] == 3 and first["items_shown"] == 9 and first["conversions"] == 1
    assert first["position_impressions"] == [3, 2, 2, 2] and first["position_clicks"] == [1, 0, 1, 1]
    assert first["items_distinct"] == 8
    assert second["users"] == 0 and second["impressions"] == 1 and second["clicked"] == 0
    assert second["items_covered"] == 8  # cumulative for the arm: nothing new in the second window


def test_a_window_is_emitted_only_once_its_impressions_are_final() -> None:
    aggregator, state = ArmAggregator(CONFIG), ArmState()
    joiner, user = FeedbackJoiner(CONFIG), UserJoinState()
    outcomes, _ = run(joiner, user, [imp("r1", 4 * MIN)], 14 * MIN)
    due = aggregator.on_outcome(state, outcomes[0], 14 * MIN)
    assert due == 5 * MIN + 10 * MIN - 1
    assert aggregator.on_timer(state, "exp", "B", due - 1) == []
    [row] = aggregator.on_timer(state, "exp", "B", due)
    assert row["impressions"] == 1 and state.windows == {}


def test_an_outcome_after_its_window_was_emitted_updates_it_within_the_grace() -> None:
    """A join instance that was idle can deliver after another instance's watermark emitted the window."""
    config = JoinConfig(attribution_ms=10 * MIN, metric_window_ms=5 * MIN, update_grace_ms=30 * MIN)
    aggregator, state, joiner = ArmAggregator(config), ArmState(), FeedbackJoiner(config)
    outcomes, _ = run(joiner, UserJoinState(), [imp("r1", MIN, user="u1")], 60 * MIN)
    late, _ = run(joiner, UserJoinState(), [imp("r2", 2 * MIN, items=("z",), user="u2")], 60 * MIN)
    due = aggregator.on_outcome(state, outcomes[0], NO_WATERMARK)
    [first] = aggregator.on_timer(state, "exp", "B", due)
    assert first["impressions"] == 1 and first["items_covered"] == 3
    assert aggregator.newly_counted(state, first)["impressions"] == 1
    again = aggregator.on_outcome(state, late[0], due + MIN)
    assert again == due  # behind the watermark: emit again now
    [second] = aggregator.on_timer(state, "exp", "B", due + MIN)
    assert second["impressions"] == 2 and second["users"] == 2 and second["items_covered"] == 4
    assert aggregator.newly_counted(state, second) == {**dict.fromkeys(ARM_COUNTERS, 0), "impressions": 1,
                                                       "users": 1, "items_shown": 1}
    assert aggregator.on_timer(state, "exp", "B", due + 31 * MIN) == [] and state.emitted == {}
    assert aggregator.on_outcome(state, late[0], due + 31 * MIN) is None  # past the grace: dropped


def test_the_stream_order_equals_the_offline_reference() -> None:
    """Shuffled arrival with per-record watermarks behind the data equals one offline pass."""
    rng = random.Random(3)
    impressions = [imp(f"r{i}", rng.randint(0, 30 * MIN), items=tuple(rng.sample("abcdefgh", 4)),
                       user=f"u{i % 7}", arm="AB"[i % 2]) for i in range(60)]
    events = [click(f"e{i}", rng.choice("abcdefgh"), rng.randint(0, 40 * MIN), rng.choice(["VIEW", "RATE"]),
                    user=f"u{i % 7}", duration_s=rng.choice([None, 0.5, 30.25, 600.0]),
                    length_s=rng.choice([None, 100.0, 1000.0])) for i in range(80)]
    want = offline_metrics(impressions, events, CONFIG)
    assert sum(r["watch_ms"] for r in want) > 0 and sum(r["completions"] for r in want) > 0
    joiner, aggregator = FeedbackJoiner(CONFIG), ArmAggregator(CONFIG)
    users: dict[str, UserJoinState] = {}
    timers: list[tuple[int, str]] = []
    for r in sorted(impressions + events, key=lambda r: rng.random()):
        s = users.setdefault(r.user_id, UserJoinState())
        _, t = joiner.on_impression(s, r, NO_WATERMARK) if isinstance(r, Impression) \
            else joiner.on_event(s, r, NO_WATERMARK)
        if t is not None:
            timers.append((t, r.user_id))
    arms: dict[tuple[str, str], ArmState] = {}
    queue = [(t, 0, user) for t, user in set(timers)]  # Flink fires each (key, time) once, in time order;
    heapq.heapify(queue)  # the arms' timers at t after the join's (the watermark passes t after both)
    got, fired = [], set()
    while queue:
        t, stage, key = heapq.heappop(queue)
        if stage == 1:
            if (t, key) not in fired:
                fired.add((t, key))
                got += aggregator.on_timer(arms[key], key[0], key[1], t)
            continue
        for o in joiner.on_timer(users[key], t)[0]:
            arm = (o.experiment, o.arm)
            heapq.heappush(queue, (aggregator.on_outcome(arms.setdefault(arm, ArmState()), o, t - 1), 1, arm))
    assert sorted(got, key=window_of) == sorted(want, key=window_of)


def window_of(row: dict) -> tuple[str, int]:
    return row["arm"], row["window_start"]


def test_redis_fields_round_trip() -> None:
    [row] = offline_metrics([imp("r1", 0)], [click("e1", "b", 1)], CONFIG)
    assert row_from_redis({k.encode(): v.encode() for k, v in redis_fields(row).items()}) == row


def test_config_checks() -> None:
    with pytest.raises(ValueError, match="conversion"):
        JoinConfig(conversions=frozenset({"BUY"}))
    with pytest.raises(ValueError):
        JoinConfig(ctr_ks=(0,))


def test_job_options_are_checked() -> None:
    import argparse

    from jobs.common import JobSetupError
    from jobs.feedback_join_job import add_arguments, job_options

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    options = job_options(parser.parse_args(["--ctr-k", "10,1", "--conversions", "purchase,like",
                                             "--attribution-min", "0.5", "--completion-actions", "rate, like",
                                             "--completion-share", "0.8"]))
    assert options["join"]["ctr_ks"] == [1, 10] and options["join"]["conversions"] == ["LIKE", "PURCHASE"]
    assert options["join"]["completion_actions"] == ["LIKE", "RATE"] and options["join"]["completion_share"] == 0.8
    assert job_options(parser.parse_args(["--completion-actions", ""]))["join"]["completion_actions"] == []
    assert options["join"]["attribution_ms"] == 30_000
    with pytest.raises(JobSetupError, match="conversion"):
        job_options(parser.parse_args(["--conversions", "BUY"]))
    with pytest.raises(JobSetupError):
        job_options(parser.parse_args(["--idle-s", "0"]))
    with pytest.raises(JobSetupError, match="completion_share"):
        job_options(parser.parse_args(["--completion-share", "1.5"]))
