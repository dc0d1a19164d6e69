"""serving/experiments.py and the experiments config: buckets, stickiness, share changes, holdout, validation,
and the arm deciding which model answers (/recommend through the app, fakes for I/O)."""

from __future__ import annotations

from collections import Counter

import pytest
from fastapi.testclient import TestClient
from serving_fakes import FakeClock, FakeStateReader, FakeZsetRedis, view
from test_serving_router import FixedGenerator

from serving.app import create_app
from serving.config import BUCKETS, ConfigError, DomainConfig, build_config
from serving.experiments import Experiments, bucket_of, bucket_ranges
from serving.fallback import PopularityFallback, PopularityGenerator
from serving.reranker import FilterReranker
from serving.service import Components
from ugt.experiment_serving import arm_serving_metrics

USERS = [f"user-{i}" for i in range(100_000)]


def experiment_config(arms: dict, **extra):
    values = {"default_domain": "movie", "experiments": {"ranker": {"arms": arms}}, **extra}
    return build_config(values, env={})


def arms_of(config, users=USERS) -> dict[str, str | None]:
    experiments = Experiments(config)
    out = {}
    for user in users:
        a = experiments.assign("movie", user)
        out[user] = a.arm if a else None
    return out


def test_bucket_is_a_stable_hash_of_experiment_and_user():
    assert bucket_of("ranker", "42") == bucket_of("ranker", "42")  # no per-process salt (unlike hash())
    # pinned (blake2b, 8 bytes, big-endian, mod 10,000): another value would reshuffle every running experiment
    assert bucket_of("ranker", "42") == 9173
    same = sum(bucket_of("ranker", u) == bucket_of("other", u) for u in USERS[:20_000])
    assert same < 20  # experiments hash independently: ~1 in 10,000 users share a bucket by chance
    assert all(0 <= bucket_of("x", u) < BUCKETS for u in USERS[:1000])


def test_ranges_are_contiguous_in_config_order():
    config = experiment_config({"b": {"share": 0.25}, "a": {"share": 0.5}})
    assert bucket_ranges(config.experiments[0].arms) == [("b", 0, 2500), ("a", 2500, 7500)]


def test_assignment_is_sticky_across_instances_and_owns_its_buckets():
    config = experiment_config({"treatment": {"share": 0.3}, "control": {"share": 0.7}})
    first, second = arms_of(config, USERS[:5000]), arms_of(config, USERS[:5000])
    assert first == second
    for user, arm in first.items():
        assert arm == ("treatment" if bucket_of("ranker", user) < 3000 else "control")


def test_distribution_matches_the_shares_over_100k_users():
    config = experiment_config({"a": {"share": 0.5}, "b": {"share": 0.3}, "holdout": {"share": 0.1, "holdout": True}})
    counts = Counter(arms_of(config).values())
    for arm, share in (("a", 0.5), ("b", 0.3), ("holdout", 0.1), (None, 0.1)):  # None: outside every arm
        assert abs(counts[arm] / len(USERS) - share) < 0.01, (arm, counts)


def test_ramping_up_moves_only_the_buckets_between_the_old_and_new_boundary():
    before = arms_of(experiment_config({"treatment": {"share": 0.05}, "control": {"share": 0.95}}))
    after = arms_of(experiment_config({"treatment": {"share": 0.10}, "control": {"share": 0.90}}))
    moved = {u for u in USERS if before[u] != after[u]}
    assert moved == {u for u in USERS if 500 <= bucket_of("ranker", u) < 1000}
    assert all(after[u] == "treatment" for u in moved) and moved  # control -> treatment only
    assert all(after[u] == "treatment" for u in USERS if before[u] == "treatment")  # nobody leaves treatment


def test_growing_the_last_arm_and_adding_one_at_the_end_moves_nobody_already_in():
    before = arms_of(experiment_config({"a": {"share": 0.2}, "b": {"share": 0.2}}))
    after = arms_of(experiment_config({"a": {"share": 0.2}, "b": {"share": 0.4}, "c": {"share": 0.1}}))
    assert all(after[u] == before[u] for u in USERS if before[u] is not None)
    assert {after[u] for u in USERS if before[u] is None} == {"b", "c", None}


def test_holdout_is_served_by_the_domains_route_and_arms_override_it():
    config = build_config({
        "default_domain": "movie",
        "domains": {"movie": {"generator": "popularity", "generator_version": "v3", "rerank": {"diversity": 0.2}}},
        "experiments": {"ranker": {"arms": {
            "new": {"share": 0.5, "generator_version": "v4", "rerank": {}},
            "out": {"share": 0.5, "holdout": True}}}},
    }, env={})
    experiments = Experiments(config)
    assert set(experiments.routes()) == {("movie", "ranker", "new")}
    route = experiments.routes()[("movie", "ranker", "new")]
    assert route.generator_version == "v4" and not route.rerank.active
    held = next(experiments.assign("movie", u) for u in USERS if bucket_of("ranker", u) >= 5000)
    assert held.holdout and held.route.generator_version == "v3" and held.route.rerank.diversity == 0.2


@pytest.mark.parametrize(("arms", "extra", "message"), [
    ({"a": {"share": 0.6}, "b": {"share": 0.5}}, {}, "arm shares add up to 1.1, more than 1"),
    ({"a": {"share": 0.12345}}, {}, "share must be a multiple of 0.0001"),
    ({"a": {"share": -0.1}}, {}, "experiments.ranker.arms.a.share"),
    ({"a": {"share": 0.1, "holdout": True, "generator": "popularity"}}, {}, "a holdout arm is served by"),
    ({"a": {"share": 0.1, "generater": "ugt"}}, {}, "experiments.ranker.arms.a.generater: unknown key (known keys: "
                                                    "checkpoint, generator, generator_version, holdout, rerank, share)"),
    ({"a": {"share": 0.1, "generator": "ugt"}}, {}, "experiments.ranker.arms.a.checkpoint: generator ugt needs"),
    ({}, {}, "an experiment needs at least one arm"),
])
def test_bad_experiment_configs_say_what_is_wrong(arms, extra, message):
    with pytest.raises(ConfigError) as err:
        experiment_config(arms, **extra)
    assert message in str(err.value)


def test_an_experiment_on_an_unrouted_domain_is_refused():
    with pytest.raises(ConfigError, match="experiments.e.domains: 'movie' is not one of domains \\['book'\\]"):
        build_config({"default_domain": "book", "domains": {"book": {}},
                      "experiments": {"e": {"domains": ["movie"], "arms": {"x": {"share": 0.5}}}}}, env={})


def test_two_experiments_on_one_domain_are_refused():
    with pytest.raises(ConfigError, match="domain 'movie' already runs experiment 'a'"):
        build_config({"experiments": {"a": {"arms": {"x": {"share": 0.5}}},
                                      "b": {"arms": {"y": {"share": 0.5}}, "domains": ["movie"]}}}, env={})


def app_with_arms(config, by_arm: dict, default):
    redis = FakeZsetRedis({"ugt:popularity:movie": {f"m{i}": 100 - i for i in range(1, 21)}})
    fallback = PopularityFallback(redis, clock=FakeClock())
    parts = Components(
        state_reader=FakeStateReader({u: view(u, ["m1"]) for u in USERS[:200]}),
        generator=default or PopularityGenerator(fallback), fallback=fallback, reranker=FilterReranker(),
        arm_generators=by_arm,
    )
    return create_app(config=config, components=parts, client=redis)


@pytest.mark.parametrize("engine", ["thread", "process"])
def test_each_response_names_its_arm_and_the_arms_model_answers_it(engine):
    config = experiment_config({"ugt": {"share": 0.5, "generator_version": "v2"}, "base": {"share": 0.3}},
                               engine=engine)
    default, arm_model = FixedGenerator("base-model", ["m5", "m6"]), FixedGenerator("arm-model", ["m7", "m8"])
    experiments = Experiments(config)
    with TestClient(app_with_arms(config, {("movie", "ranker", "ugt"): arm_model}, default)) as client:
        ids = set()
        for user in USERS[:200]:
            body = client.post("/recommend", json={"user_id": user, "k": 2}).json()
            expected = experiments.assign("movie", user)
            assert body["experiment"] == (expected and "ranker") and body["arm"] == (expected and expected.arm)
            model = "arm-model-v9" if body["arm"] == "ugt" else "base-model-v9"
            assert body["model"] == model, body
            ids.add(body["request_id"])
        assert len(ids) == 200 and all(len(i) == 32 for i in ids)
        schema = client.get("/openapi.json").json()["components"]["schemas"]["RecommendResponse"]
        assert {"request_id", "experiment", "arm"} <= set(schema["properties"])


def test_without_experiments_responses_carry_null_arm():
    config = build_config({"default_domain": "movie"}, env={})
    with TestClient(app_with_arms(config, {}, FixedGenerator("m", ["m5"]))) as client:
        body = client.post("/recommend", json={"user_id": USERS[0], "k": 1}).json()
    assert body["experiment"] is None and body["arm"] is None and body["request_id"]


def test_arm_generators_are_keyed_by_domain_experiment_and_arm():
    config = build_config({"default_domain": "movie", "domains": {"movie": {}, "book": {}},
                           "experiments": {"e": {"domains": ["movie", "book"], "arms": {"a": {"share": 1.0,
                                                                                              "generator_version": "v7"}}}}},
                          env={})
    assert set(Experiments(config).routes()) == {("movie", "e", "a"), ("book", "e", "a")}
    assert Experiments(config).routes()[("book", "e", "a")] == DomainConfig("book", generator_version="v7")


def test_impression_keys_are_off_by_default_and_bounded():
    config = build_config({}, env={})
    assert config.impressions is False and config.experiments == ()
    assert build_config({}, env={"UGT_SERVING_IMPRESSIONS": "true"}).impressions is True
    with pytest.raises(ConfigError, match="impression_buffer: Input should be greater than or equal to 1"):
        build_config({"impression_buffer": 0}, env={})


class FailingGenerator(FixedGenerator):
    """Raises on every call: the service answers with the generator_error fallback."""

    def recommend(self, state, k, exclude, *, domain):
        raise RuntimeError("broken model")

    def recommend_batch(self, requests):
        raise RuntimeError("broken model")


@pytest.mark.parametrize("engine", ["thread", "process"])
def test_serving_latency_and_outcomes_are_counted_per_arm(engine):
    """ugt_serving_arm_* per (experiment, arm), read back the way `ugt experiment report --serving-url` reads them
    (with engine: process the scrape adds up the engine's and the HTTP process's series)."""
    config = experiment_config({"ugt": {"share": 0.5, "generator_version": "v2"}, "base": {"share": 0.3}},
                               engine=engine)
    broken = FailingGenerator("arm-model", ["m7"])
    experiments = Experiments(config)
    users = USERS[:120]
    with TestClient(app_with_arms(config, {("movie", "ranker", "ugt"): broken},
                                  FixedGenerator("base", ["m5", "m6"]))) as client:
        for user in users:
            assert client.post("/recommend", json={"user_id": user, "k": 2}).status_code == 200
        text = client.get("/metrics").text
    arms = Counter(a.arm for u in users if (a := experiments.assign("movie", u)) is not None)
    got = arm_serving_metrics(text, "ranker")
    assert set(got) == {"ugt", "base"}
    assert (got["ugt"]["requests"], got["ugt"]["fallback"], got["ugt"]["model"]) == (arms["ugt"], arms["ugt"], 0)
    assert (got["base"]["requests"], got["base"]["model"], got["base"]["error"]) == (arms["base"], arms["base"], 0)
    assert got["ugt"]["fallback_rate"] == 1.0 and got["base"]["fallback_rate"] == 0.0
    assert 0 < got["base"]["p99_s"] < 2.5
    counts = {s.split("{")[1]: float(s.split()[-1]) for s in text.splitlines()
              if s.startswith("ugt_serving_arm_latency_seconds_count")}
    assert sum(counts.values()) == arms["ugt"] + arms["base"]  # one latency per answered arm request, no other


def test_a_request_nothing_can_answer_counts_as_its_arms_error():
    config = experiment_config({"only": {"share": 1.0}})
    redis = FakeZsetRedis({})  # no popularity list: the fallback has nothing either
    fallback = PopularityFallback(redis, clock=FakeClock())
    parts = Components(state_reader=FakeStateReader({}), generator=FailingGenerator("m", []), fallback=fallback,
                       reranker=FilterReranker())
    with TestClient(create_app(config=config, components=parts, client=redis)) as client:
        assert client.post("/recommend", json={"user_id": "u1", "k": 2}).status_code == 503
        got = arm_serving_metrics(client.get("/metrics").text, "ranker")["only"]
    assert (got["requests"], got["error"], got["error_rate"]) == (1, 1, 1.0)
