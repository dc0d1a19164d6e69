"""PopularityFallback: Redis order, history/exclude filtering, rate-limited refresh, stale cache, file fallback."""

import json

import pytest
from serving_fakes import FakeClock, FakeZsetRedis

from serving.fallback import NoPopularity, PopularityFallback, load_popularity_file, write_popularity_file
from serving.generator import ScoredItem

SETS = {"ugt:popularity:movie": {"m1": 50, "m2": 40, "m3": 30, "m4": 20, "m5": 10}}


def make(redis=None, file_items=None, clock=None, **kw) -> PopularityFallback:
    return PopularityFallback(redis, file_items, clock=clock or FakeClock(), refresh_interval_s=1.0, **kw)


def ids(answer) -> list[str]:
    return [i.item_id for i in answer.items]


def test_most_popular_first_from_redis():
    answer = make(FakeZsetRedis(SETS)).recommend("movie", 3, set())
    assert ids(answer) == ["m1", "m2", "m3"]
    assert answer.items[0] == ScoredItem("m1", 50.0)
    assert answer.source == "redis"


def test_never_returns_history_or_excluded():
    answer = make(FakeZsetRedis(SETS)).recommend("movie", 3, {"m1", "m3"})
    assert ids(answer) == ["m2", "m4", "m5"]


def test_returns_fewer_when_everything_is_excluded():
    assert ids(make(FakeZsetRedis(SETS)).recommend("movie", 3, {"m1", "m2", "m3", "m4"})) == ["m5"]


def test_cache_size_bounds_the_read():
    fallback = make(FakeZsetRedis(SETS), cache_size=2)
    assert ids(fallback.recommend("movie", 5, set())) == ["m1", "m2"]


def test_refreshes_at_most_once_per_interval():
    redis, clock = FakeZsetRedis(SETS), FakeClock()
    fallback = make(redis, clock=clock)
    for _ in range(5):
        fallback.recommend("movie", 2, set())
    assert redis.calls == 1
    redis.sets["ugt:popularity:movie"]["m9"] = 99  # a new hit, not visible until the interval passes
    clock.now = 0.5
    assert ids(fallback.recommend("movie", 1, set())) == ["m1"]
    clock.now = 1.0
    assert ids(fallback.recommend("movie", 1, set())) == ["m9"]
    assert redis.calls == 2


def test_domains_are_cached_separately():
    redis = FakeZsetRedis({**SETS, "ugt:popularity:book": {"b1": 5}})
    fallback = make(redis)
    assert ids(fallback.recommend("book", 3, set())) == ["b1"]
    assert ids(fallback.recommend("movie", 1, set())) == ["m1"]


def test_keeps_serving_the_last_good_list_when_redis_fails():
    redis, clock = FakeZsetRedis(SETS), FakeClock()
    fallback = make(redis, file_items={"movie": [ScoredItem("f1", 1.0)]}, clock=clock)
    fallback.recommend("movie", 2, set())
    redis.down = True
    clock.now = 5.0
    answer = fallback.recommend("movie", 2, {"m1"})
    assert ids(answer) == ["m2", "m3"] and answer.source == "redis_stale"
    calls = redis.calls
    fallback.recommend("movie", 2, set())  # within the interval: no new attempt on a dead Redis
    assert redis.calls == calls
    redis.down = False
    clock.now = 6.0
    assert fallback.recommend("movie", 1, set()).source == "redis"


def test_file_answers_when_redis_is_down_from_the_start():
    redis = FakeZsetRedis(SETS)
    redis.down = True
    fallback = make(redis, file_items={"movie": [ScoredItem("f1", 9.0), ScoredItem("f2", 5.0)]})
    answer = fallback.recommend("movie", 5, {"f1"})
    assert ids(answer) == ["f2"] and answer.source == "file"


def test_file_answers_for_a_domain_redis_does_not_have():
    fallback = make(FakeZsetRedis(SETS), file_items={"book": [ScoredItem("b7", 3.0)]})
    assert ids(fallback.recommend("book", 5, set())) == ["b7"]


def test_nothing_anywhere_raises_with_the_reason():
    redis = FakeZsetRedis()
    redis.down = True
    with pytest.raises(NoPopularity, match="unreachable.*not configured"):
        make(redis).recommend("movie", 5, set())
    with pytest.raises(NoPopularity, match="ugt:popularity:movie is empty"):
        make(FakeZsetRedis()).recommend("movie", 5, set())
    with pytest.raises(NoPopularity, match="no Redis client"):
        make(None).recommend("movie", 5, set())


def test_no_popularity_says_whether_every_source_answered_and_survives_pickling():
    import pickle

    down = FakeZsetRedis()
    down.down = True
    cases = [(down, False), (FakeZsetRedis(), True), (None, True)]
    for client, settled in cases:
        with pytest.raises(NoPopularity) as caught:
            make(client).recommend("movie", 5, set())
        assert caught.value.settled is settled
        again = pickle.loads(pickle.dumps(caught.value))  # engine: process sends it between processes
        assert again.settled is settled and str(again) == str(caught.value)


def test_known_domains_are_the_files_and_those_redis_had_a_list_for():
    fallback = make(FakeZsetRedis(SETS), file_items={"book": [ScoredItem("b7", 3.0)], "empty": []})
    assert fallback.known_domains() == ["book"]
    fallback.recommend("movie", 1, set())
    with pytest.raises(NoPopularity):
        fallback.recommend("games", 1, set())
    assert fallback.known_domains() == ["book", "movie"]


def test_observer_sees_each_source():
    seen = []
    fallback = make(FakeZsetRedis(SETS))
    fallback.observer = seen.append
    fallback.recommend("movie", 1, set())
    assert seen == ["redis"]


def test_file_round_trip_sorted_and_deduplicated(tmp_path):
    path = tmp_path / "pop.json"
    path.write_text(
        json.dumps(
            {
                "version": 1,
                "domains": {
                    "movie": [
                        {"item_id": "b", "score": 2},
                        {"item_id": "a", "score": 5},
                        {"item_id": "b", "score": 7},
                        {"item_id": "c", "score": 2},
                    ]
                },
            }
        )
    )
    loaded = load_popularity_file(path)
    assert [(i.item_id, i.score) for i in loaded["movie"]] == [("b", 7.0), ("a", 5.0), ("c", 2.0)]
    out = tmp_path / "sub" / "again.json"
    write_popularity_file(out, loaded)
    assert load_popularity_file(out) == loaded


def test_snapshot_reads_every_domain():
    redis = FakeZsetRedis({**SETS, "ugt:popularity:book": {"b1": 5}})
    snap = make(redis).snapshot()
    assert sorted(snap) == ["book", "movie"] and snap["book"] == (ScoredItem("b1", 5.0),)


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "cannot be read as JSON"),
        ('{"movie": []}', "must be an object with a 'domains' object"),
        ('{"version": 2, "domains": {}}', "has version 2"),
        ('{"domains": {"movie": {"a": 1}}}', "domains.movie must be a list"),
        ('{"domains": {"movie": [{"item_id": "", "score": 1}]}}', r"domains.movie\[0\]"),
        ('{"domains": {"movie": [{"item_id": "a", "score": "high"}]}}', r"domains.movie\[0\]"),
    ],
)
def test_bad_popularity_files_say_what_is_wrong(tmp_path, content, message):
    path = tmp_path / "pop.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        load_popularity_file(path)
