"""The e2e bench's traffic schedule (bench/e2e_load.py): shares, who a miss/hit/append may ask for, Zipf skew."""

from __future__ import annotations

import numpy as np

from bench.e2e_load import APPEND, HIT, MISS, make_schedule


def test_the_mix_and_who_each_class_asks_for():
    s = make_schedule(5000.0, 4.0, (0.1, 0.2, 0.7), seen=1000, total_users=100_000, seed=1)
    n = len(s.times)
    assert abs(n - 20_000) < 600 and np.all(np.diff(s.times) > 0)
    shares = np.bincount(s.classes, minlength=3) / n
    assert np.allclose(shares, [0.1, 0.2, 0.7], atol=0.02)
    misses = s.users[s.classes == MISS]
    assert np.array_equal(misses, np.arange(1000, 1000 + len(misses)))  # each a never-requested user, in order
    assert s.seen_after == 1000 + len(misses)
    for i in np.flatnonzero(s.classes != MISS):  # hits and appends: only users requested before that moment
        assert s.users[i] < 1000 + np.sum(s.classes[:i] == MISS)


def test_seen_users_are_drawn_zipf_like_and_misses_stop_when_nobody_is_left():
    s = make_schedule(2000.0, 5.0, (0.0, 0.5, 0.5), seen=10_000, total_users=10_000, seed=2)
    counts = np.bincount(s.users, minlength=10_000)
    assert counts[:10].sum() > 20 * counts[-10:].sum()  # the head is asked far more often than the tail
    full = make_schedule(2000.0, 1.0, (1.0, 0.0, 0.0), seen=0, total_users=50, seed=3)
    assert np.sum(full.classes == MISS) == 50 and set(full.classes[50:]) == {HIT}
    assert APPEND not in set(full.classes)


def test_a_popular_last_warm_up_asks_the_same_users_most_popular_last():
    plain = make_schedule(5000.0, 1.0, (1.0, 0.0, 0.0), seen=0, total_users=3000, seed=4)
    warm = make_schedule(5000.0, 1.0, (1.0, 0.0, 0.0), seen=0, total_users=3000, seed=4, popular_last=True)
    assert plain.seen_after == warm.seen_after == 3000
    first = warm.users[warm.classes == MISS]
    assert sorted(first.tolist()) == list(range(3000)) and first[-1] == 0 and first[0] == 2999
    assert list(plain.users[plain.classes == MISS][:3]) == [0, 1, 2]  # the default order is unchanged
