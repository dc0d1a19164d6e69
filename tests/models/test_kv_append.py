"""The KV cache follows the stream: a user with new events appends them to their cached prefix (models/ugt/runner/
append.py) and scores exactly as a full recompute; the pool keeps to its byte budget; hit/append/miss count right.

Tolerance: CPU fp32, max abs diff of the scores < 1e-5 and the same top-k against an engine with no cache (every
row prefilled). The CUDA variant (fp32 with CUDA graphs: the append step is one graph per (bucket, suffix width))
holds < 1e-4 and the same top-k; it skips without a GPU.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.data import history_row
from models.ugt.inference import BatchDescriptor, InferenceConfig, UGTInference
from tests.models.test_inference import excludes_of, make_model

WINDOW, LONG = 12, 10  # make_model: recent_len 12, max_long 10 (long-term tokens once a history passes 12)
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="the GPU variant needs CUDA")
TOLERANCE = {"cpu": 1e-5, "cuda": 1e-4}


def histories(n_users: int, length: int = 30, seed: int = 3):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_users):
        items = rng.integers(1, 41, size=length)
        times = 1_600_000_000 + np.cumsum(rng.integers(1, 90_000, size=length))
        out.append((items, times, rng.integers(0, 10, size=length)))
    return out


def row_of(history, n: int, later: int = 0) -> dict[str, np.ndarray]:
    """The model row of the first ``n`` events, requested ``later`` seconds after the 100 s past the last one."""
    items, times, ratings = history
    return history_row(items[:n], times[:n], ratings[:n], WINDOW, LONG, int(times[n - 1]) + 100 + later)


def assert_same_answers(got, want, tolerance: float) -> None:
    for g, w in zip(got, want, strict=True):
        assert g.indices.tolist() == w.indices.tolist()
        assert np.abs(g.scores - w.scores).max() < tolerance


def engines(device: str, slots: int = 16):
    """(the cached engine under test, a no-cache engine that recomputes every row)."""
    cfg = {"device": device, "dtype": "fp32", "batch_buckets": (1, 8, 32)}
    return UGTInference(make_model(1), InferenceConfig(**cfg, cache_slots=slots)), \
        UGTInference(make_model(1), InferenceConfig(**cfg))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
@pytest.mark.parametrize("added", [1, 3])
def test_appended_prefixes_score_like_a_full_recompute_in_a_batch_of_hits_appends_and_misses(device, added):
    cached, plain = engines(device)
    users = histories(7)
    keys = [f"u{i}" for i in range(7)]
    first = [1, 4, 6, 9 - added, 5, 12, 11]
    rows = [row_of(h, n) for h, n in zip(users, first, strict=True)]
    cached.recommend(rows[:6], excludes_of(rows[:6]), 8, keys[:6])
    assert cached.cache.stats()["miss"] == 6
    # u0, u1, u3: `added` new events (u0 from a single event; u3 fills the window to 9 + 0..); u2: none (a hit);
    # u4: two new events; u5: its window slides (long-term tokens appear): a miss; u6: never seen, a miss
    later = [first[0] + added, first[1] + added, first[2], first[3] + added, first[4] + 2, first[5] + 1, first[6]]
    rows2 = [row_of(h, n, later=600) for h, n in zip(users, later, strict=True)]
    got = cached.recommend(rows2, excludes_of(rows2), 8, keys)
    assert_same_answers(got, plain.recommend(rows2, excludes_of(rows2), 8), TOLERANCE[device])
    assert {k: cached.cache.stats()[k] for k in ("hit", "append", "miss")} == {"hit": 1, "append": 4, "miss": 8}
    # the appended slots now hold what a prefill writes: a later request of the same events decodes exactly
    rows3 = [row_of(h, n, later=7200) for h, n in zip(users, later, strict=True)]
    got = cached.recommend(rows3, excludes_of(rows3), 8, keys)
    assert_same_answers(got, plain.recommend(rows3, excludes_of(rows3), 8), TOLERANCE[device])
    assert cached.cache.stats()["hit"] == 8
    if device == "cuda":
        assert BatchDescriptor("append", 8, suffix=4) in cached.graphs  # 4 rows, longest suffix 3 or 4 tokens


def test_the_appended_slot_holds_the_keys_and_values_of_a_prefill():
    cached, _ = engines("cpu")
    fresh, _ = engines("cpu")
    user = histories(1, seed=5)[0]
    cached.recommend([row_of(user, 4)], [np.array([0])], 5, ["a"])
    cached.recommend([row_of(user, 9, later=60)], [np.array([0])], 5, ["a"])
    fresh.recommend([row_of(user, 9, later=60)], [np.array([0])], 5, ["a"])
    assert cached.cache.appends == 1 and fresh.cache.misses == 1
    a, b = cached.cache.entries["a"].slot, fresh.cache.entries["a"].slot
    valid = fresh.stack.pool.valid[b]
    assert torch.equal(cached.stack.pool.valid[a], valid) and torch.equal(cached.stack.pool.times[a], fresh.stack.pool.times[b])
    diff = (cached.stack.pool.k[:, a, :, valid] - fresh.stack.pool.k[:, b, :, valid]).abs().max()
    assert diff < 1e-5 and (cached.stack.pool.v[:, a, :, valid] - fresh.stack.pool.v[:, b, :, valid]).abs().max() < 1e-5


def test_what_cannot_be_appended_exactly_is_a_counted_miss():
    """A slid window moves every position; changed long-term tokens change every key; an edited past event or a
    shorter history is no extension: each is recomputed, and its answer is the full recompute's."""
    cached, plain = engines("cpu")
    users = histories(4, seed=7)
    keys = ["slid", "long", "edited", "shorter"]
    rows = [row_of(users[0], 12), row_of(users[1], 15), row_of(users[2], 6), row_of(users[3], 8)]
    cached.recommend(rows, excludes_of(rows), 8, keys)
    edited = row_of(users[2], 8, later=30)
    edited["ratings"][0, 2] = (edited["ratings"][0, 2] + 1) % 10
    rows2 = [row_of(users[0], 13, 30), row_of(users[1], 16, 30), edited, row_of(users[3], 7, 30)]
    got = cached.recommend(rows2, excludes_of(rows2), 8, keys)
    assert_same_answers(got, plain.recommend(rows2, excludes_of(rows2), 8), 1e-5)
    assert cached.cache.stats()["append"] == 0 and cached.cache.stats()["miss"] == 8


def test_the_pool_keeps_to_its_byte_budget_and_evicts_the_least_recent_user():
    probe = UGTInference(make_model(1), InferenceConfig(device="cpu", dtype="fp32", cache_slots=1))
    budget = 4 * probe.slot_bytes + probe.slot_bytes // 2  # three users and the scratch slot fit, not four
    eng = UGTInference(make_model(1), InferenceConfig(device="cpu", dtype="fp32", cache_slots=100,
                                                      cache_bytes=budget))
    assert eng.cache.capacity == 3 and eng.cache.bytes_reserved <= budget
    pool = eng.stack.pool
    assert (pool.k.numel() + pool.v.numel()) * 4 + pool.times.numel() * 8 + pool.valid.numel() == eng.cache.bytes_reserved
    users = histories(5, seed=9)
    for i, h in enumerate(users):
        eng.recommend([row_of(h, 5)], [np.array([0])], 3, [f"u{i}"])
        assert eng.cache.bytes_used == min(i + 1, 3) * eng.slot_bytes <= budget
    assert list(eng.cache.entries) == ["u2", "u3", "u4"]
    eng.recommend([row_of(users[2], 7, 10)], [np.array([0])], 3, ["u2"])  # still cached: an append
    eng.recommend([row_of(users[0], 7, 10)], [np.array([0])], 3, ["u0"])  # evicted: a miss, evicting u3
    assert eng.cache.stats()["append"] == 1 and eng.cache.stats()["miss"] == 6
    assert list(eng.cache.entries) == ["u4", "u2", "u0"]
    with pytest.raises(ValueError, match="cache_bytes .* holds no user"):
        UGTInference(make_model(1), InferenceConfig(device="cpu", cache_slots=10, cache_bytes=probe.slot_bytes))
    smaller = UGTInference(make_model(1), InferenceConfig(device="cpu", cache_slots=2, cache_bytes=budget))
    assert smaller.cache.capacity == 2  # the slot count still caps the pool


def test_a_refused_user_is_prefilled_in_scratch_and_answered_as_an_admitted_one():
    model, users = make_model(1), histories(5, seed=11)
    lru = UGTInference(model, InferenceConfig(device="cpu", dtype="fp32", cache_slots=2))
    door = UGTInference(model, InferenceConfig(device="cpu", dtype="fp32", cache_slots=2,
                                               cache_admission="second_sight"))
    for i, h in enumerate(users):  # u2.. meet a full pool: refused by second_sight, evicting under lru
        want = lru.recommend([row_of(h, 5)], [np.array([0])], 5, [f"u{i}"])[0]
        got = door.recommend([row_of(h, 5)], [np.array([0])], 5, [f"u{i}"])[0]
        assert got.indices.tolist() == want.indices.tolist() and np.allclose(got.scores, want.scores, atol=1e-5)
    assert door.cache.refused == 3 and list(door.cache.entries) == ["u0", "u1"]
    again = door.recommend([row_of(users[4], 7, 10)], [np.array([0])], 5, ["u4"])[0]  # second sight: admitted
    assert list(door.cache.entries) == ["u1", "u4"]
    assert again.indices.tolist() == lru.recommend([row_of(users[4], 7, 10)], [np.array([0])], 5, ["u4"])[0].indices.tolist()
    with pytest.raises(ValueError, match="cache_admission"):
        UGTInference(model, InferenceConfig(device="cpu", cache_slots=2, cache_admission="lfu"))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
def test_ranking_after_an_append_reads_the_appended_prefix(device):
    from tests.models.test_ranking import make_model as ranked_model

    model = ranked_model(2, long_groups=3)
    cfg = {"device": device, "dtype": "fp32", "rank_top": 6, "batch_buckets": (1, 8)}
    cached = UGTInference(model, InferenceConfig(**cfg, cache_slots=4))
    miss = UGTInference(model, InferenceConfig(**cfg, cache_slots=4))
    users = histories(2, seed=11)
    first = [row_of(users[0], 3), row_of(users[1], 7)]
    cached.recommend(first, excludes_of(first), 6, ["a", "b"])
    rows = [row_of(users[0], 5, 40), row_of(users[1], 8, 40)]
    got = cached.recommend(rows, excludes_of(rows), 6, ["a", "b"])
    assert cached.cache.appends == 2
    assert_same_answers(got, miss.recommend(rows, excludes_of(rows), 6, ["a", "b"]), TOLERANCE[device])


@CUDA
def test_cuda_bf16_appends_agree_with_a_bf16_full_recompute():
    """bf16 with CUDA graphs and the Triton prefill (the served GPU path): an append against a prefilled prefix
    rounds differently from a whole prefill, so the bound is bf16's: scores within 0.05, 4 of the top 5 shared."""
    cfg = {"device": "cuda", "batch_buckets": (1, 8, 32)}
    cached = UGTInference(make_model(1), InferenceConfig(**cfg, cache_slots=16))
    plain = UGTInference(make_model(1), InferenceConfig(**cfg))
    assert cached.graphs_on and cached.fused
    users = histories(6, seed=13)
    keys = [f"u{i}" for i in range(6)]
    rows = [row_of(h, n) for h, n in zip(users, [2, 3, 5, 7, 8, 4], strict=True)]
    cached.recommend(rows, excludes_of(rows), 10, keys)
    rows2 = [row_of(h, n, 300) for h, n in zip(users, [3, 6, 5, 9, 12, 5], strict=True)]
    got = cached.recommend(rows2, excludes_of(rows2), 10, keys)
    assert cached.cache.appends == 5 and cached.cache.hits == 1
    for g, w in zip(got, plain.recommend(rows2, excludes_of(rows2), 10), strict=True):
        assert len(set(g.indices[:5].tolist()) & set(w.indices.tolist())) >= 4
        np.testing.assert_allclose(g.scores, w.scores, atol=0.05)


def test_suffix_writes_repeat_a_live_token_for_padding_and_leave_a_row_without_one_unchanged():
    """The append step's in-place writes: padding tokens (position T) repeat their row's last live token (same
    values, same place), and a row with no live token writes position T - 1 with what it holds already."""
    from models.ugt.runner.append import keep_or, suffix_writes, write_suffix

    T, H, d = 6, 2, 3
    dest = torch.tensor([[2, 3, T, T], [T, T, T, T], [5, T, T, T]])
    pick, at, live_rows = suffix_writes(dest, T)
    assert pick.tolist() == [[0, 1, 1, 1], [0, 0, 0, 0], [0, 0, 0, 0]]
    assert at.tolist() == [[2, 3, 3, 3], [T - 1] * 4, [5, 5, 5, 5]] and live_rows.tolist() == [True, False, True]
    window = torch.randn(3, H, T, d)
    new = torch.randn(3, 4, H, d)
    values = keep_or(new, pick, at, live_rows, window)
    cache = window.clone()
    write_suffix(cache, torch.arange(3), at, values)
    want = window.clone()
    want[0, :, 2], want[0, :, 3], want[2, :, 5] = new[0, 0], new[0, 1], new[2, 0]
    assert torch.equal(cache, want)  # row 1 unchanged; nothing past each row's live tokens written


@CUDA
@pytest.mark.parametrize("rank_top", [0, 6])
def test_cuda_eager_prefills_answer_as_the_graph_replayed_ones(rank_top):
    """A prefill of at least ``eager_prefill_activations`` elements runs eagerly on its own rows (no padded graph):
    the same answers as the graph of its bucket, alone and beside appends in one batch, with or without ranking."""
    from tests.models.test_ranking import make_model as ranked_model

    model = ranked_model(2, long_groups=3)
    cfg = {"device": "cuda", "dtype": "fp32", "rank_top": rank_top, "batch_buckets": (1, 8, 32)}
    eager = UGTInference(model, InferenceConfig(**cfg, cache_slots=16, eager_prefill_activations=1))
    graphed = UGTInference(model, InferenceConfig(**cfg, cache_slots=16, eager_prefill_activations=0))
    users = histories(7, seed=17)
    keys = [f"u{i}" for i in range(7)]
    rows = [row_of(h, n) for h, n in zip(users[:5], [2, 4, 6, 9, 5], strict=True)]  # 5 misses, bucket 8
    for engine in (eager, graphed):
        engine.recommend(rows, excludes_of(rows), 6, keys[:5])
    assert not any(key.kind == "prefill" for key in eager.graphs)
    assert BatchDescriptor("prefill", 8) in graphed.graphs
    rows2 = [row_of(h, n, 300) for h, n in zip(users, [3, 6, 6, 10, 5, 7, 8], strict=True)]  # appends, a hit, misses
    got = eager.recommend(rows2, excludes_of(rows2), 6, keys)
    assert_same_answers(got, graphed.recommend(rows2, excludes_of(rows2), 6, keys), TOLERANCE["cuda"])
    assert eager.cache.stats()["miss"] == graphed.cache.stats()["miss"] == 7
