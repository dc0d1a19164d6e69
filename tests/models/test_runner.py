"""The runner's parts on their own (models.ugt.runner): packing, the slot cache, graph keys, retrieval and merge.

The end-to-end answers of the composed engine are in test_inference.py; these pin each part's contract.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.data import history_row
from models.ugt.runner.append import put, suffix_width
from models.ugt.runner.batch import COMPACT_WIDTH, ROW_FIELDS, BatchLayout, exclusion_matrix
from models.ugt.runner.beam import union_candidates
from models.ugt.runner.graphs import BatchDescriptor, GraphDispatcher, bucket_size
from models.ugt.runner.merge import RRF_K, rrf_merge
from models.ugt.runner.outputs import Pending
from models.ugt.runner.retrieval import retrieve, score_candidates
from models.ugt.runner.slot_cache import APPEND, HIT, MISS, PrefixCache, SlotPool

N, E = 6, 4


def rows(lengths: list[int]) -> list[dict[str, np.ndarray]]:
    out = []
    for i, n in enumerate(lengths):
        times = 1_600_000_000 + np.arange(n) * 1000
        out.append(history_row(np.arange(1, n + 1) + i, times, np.full(n, 3), N, E, int(times[-1]) + 60))
    return out


# ---- packing ---------------------------------------------------------------------------------------------


def test_pack_then_unpack_gives_back_every_field_and_pads_with_the_scratch_slot():
    layout = BatchLayout(N, E, torch.device("cpu"), scratch_slot=9)
    batch = rows([2, 6, 9])  # 9 > N: the window is full and older events went to the long-term fields
    excl = exclusion_matrix([np.array([3]), np.array([1, 2, 5]), np.array([], np.int64)])
    host = layout.pack(layout.row_vectors(batch), excl, [4, 5, 6], pad_to=5)
    assert host.shape == (5, layout.width + 1 + 4)
    got = layout.unpack(host)
    for key in (*ROW_FIELDS, "long_ids", "long_times"):
        want = np.concatenate([r[key][:, :E] if key.startswith("long") else r[key] for r in batch])
        np.testing.assert_array_equal(got[key][:3].numpy(), want)
    np.testing.assert_array_equal(got["lengths"][:3].numpy(), [2, 6, 6])
    assert host[:3, layout.width].tolist() == [4, 5, 6] and host[3:, layout.width].tolist() == [9, 9]
    assert (host[3:, : layout.width] == 0).all()
    torch.testing.assert_close(layout.exclusions(host)[:3], torch.as_tensor(excl))


def test_compact_pack_holds_exactly_the_last_events_of_the_full_pack():
    layout = BatchLayout(N, E, torch.device("cpu"), scratch_slot=7)
    batch = rows([1, 4, 6])
    vectors, excl = layout.row_vectors(batch), exclusion_matrix([np.array([1])] * 3)
    full = layout.last_events(layout.pack(vectors, excl, [0, 1, 2], 4), compact=False)
    compact_host = layout.pack_compact(vectors, excl, [0, 1, 2], 4)
    compact = layout.last_events(compact_host, compact=True)
    assert compact_host.shape == (4, COMPACT_WIDTH + 1)
    for key in ROW_FIELDS:
        torch.testing.assert_close(compact[0][key], full[0][key])
    torch.testing.assert_close(compact[1], full[1])
    assert compact[2].tolist() == [0, 1, 2, 7]
    torch.testing.assert_close(layout.exclusions(compact_host, compact=True), layout.exclusions(
        layout.pack(vectors, excl, [0, 1, 2], 4)))


def test_exclusion_matrix_is_a_power_of_two_wide_and_zero_padded():
    m = exclusion_matrix([np.array([4, 2, 9]), np.array([], np.int64), np.arange(1, 6)])
    assert m.shape == (3, 8) and m[0, :3].tolist() == [4, 2, 9] and not m[0, 3:].any() and not m[1].any()
    assert exclusion_matrix([np.array([], np.int64)]).shape == (1, 1)


def test_a_batch_padded_below_its_size_is_refused():
    layout = BatchLayout(N, E, torch.device("cpu"))
    vectors = layout.row_vectors(rows([2, 3]))
    with pytest.raises(ValueError, match="cannot pad a batch of 2 rows to 1"):
        layout.pack(vectors, exclusion_matrix([np.array([1])] * 2), [0, 0], 1)


# ---- the slot cache --------------------------------------------------------------------------------------


def test_prefix_cache_evicts_the_least_recent_user_and_a_moved_prefix_keeps_its_slot():
    cache = PrefixCache(2)
    slots, hits = cache.assign(["a", "b"], [b"1", b"1"])
    assert hits == [False, False] and sorted(slots) == [0, 1] and cache.misses == 2
    assert cache.assign(["a"], [b"1"]) == ([slots[0]], [True])  # a is now the most recent
    moved, hit = cache.assign(["b"], [b"2"])  # b's events changed: prefilled again into its own slot
    assert moved == [slots[1]] and hit == [False]
    new, _ = cache.assign(["c"], [b"1"])  # full: a is the least recent now, so c takes a's slot
    assert new == [slots[0]] and list(cache.entries) == ["b", "c"] and cache.hits == 1 and cache.misses == 4


def test_second_sight_keeps_a_one_off_user_out_of_a_full_pool_and_admits_it_when_it_comes_back():
    cache = PrefixCache(2, admission="second_sight")
    first = cache.assign(["a", "b"], [b"1", b"1"])[0]  # free slots: admitted at once
    slots, hits = cache.assign(["c"], [b"1"])  # the pool is full and c is new: prefilled into scratch
    assert slots == [cache.scratch] and hits == [False] and list(cache.entries) == ["a", "b"]
    assert cache.stats()["refused"] == 1 and cache.misses == 3
    slots, _ = cache.assign(["c"], [b"1"])  # its second sight: admitted, evicting the least recent (a)
    assert slots == [first[0]] and list(cache.entries) == ["b", "c"] and not cache.refused_keys
    for i in range(20):  # the doorkeeper remembers at most 4 x capacity refused users
        cache.assign([f"x{i}"], [b"1"])
    assert len(cache.refused_keys) == 8 and cache.refused == 21 and list(cache.entries) == ["b", "c"]
    lru = PrefixCache(2)
    lru.assign(["a", "b", "c"], [b"1"] * 3)
    assert list(lru.entries) == ["b", "c"] and lru.refused == 0
    with pytest.raises(ValueError, match="admission"):
        PrefixCache(2, admission="lfu")


def test_lookup_appends_only_a_longer_row_whose_committed_positions_match_and_counts_each_kind():
    cache = PrefixCache(4, slot_bytes=100)
    committed = {(0, 2): b"p", (0, 4): b"q", (1, 1): b"r"}  # (row, m) -> print; anything else differs

    def prints_of(row: int, m: int) -> bytes:
        return committed.get((row, m), b"other")

    first = cache.lookup(["a", "b"], [b"1", b"2"], [3, 2], prints_of)
    assert first.kinds == [MISS, MISS] and cache.entries["a"].committed == b"p" and cache.entries["a"].length == 3
    # a: 5 events whose first 2 positions print as before -> append from 2; b: 2 events, other print -> miss
    # (not longer); a repeat of a in the batch and a None key -> scratch, uncounted
    second = cache.lookup(["a", "b", "a", None], [b"3", b"9", b"3", b"x"], [5, 2, 5, 1], prints_of)
    assert second.kinds == [APPEND, MISS, MISS, MISS] and second.starts == [2, 0, 0, 0]
    assert second.slots[0] == first.slots[0] and second.slots[2:] == [cache.scratch] * 2
    assert cache.lookup(["a"], [b"3"], [5], prints_of).kinds == [HIT]
    edited = cache.lookup(["a"], [b"4"], [6], lambda row, m: b"edited")  # a past event changed: a miss
    assert edited.kinds == [MISS] and cache.stats() == {"hit": 1, "append": 1, "miss": 4, "refused": 0, "users": 2,
                                                         "bytes_used": 200, "bytes_reserved": 500}
    assert cache.lookup(["a"], [b"5"], [7]).kinds == [MISS]  # without committed prints nothing appends


def test_committed_print_covers_the_first_positions_and_the_long_term_input_only():
    layout = BatchLayout(N, E, torch.device("cpu"))
    short, longer = rows([3])[0], history_row(np.arange(1, 6), 1_600_000_000 + np.arange(5) * 1000, np.full(5, 3),
                                              N, E, 1_600_009_000)
    a, b = layout.row_vectors([short, longer])
    assert layout.committed_print(a, 2) == layout.committed_print(b, 2) != layout.committed_print(b, 3)
    b2 = b.copy()
    b2[6 * N + 1] = 7  # a long-term id
    assert layout.committed_print(b2, 2) != layout.committed_print(b, 2)


def test_put_writes_at_positions_and_drops_index_past_the_end():
    cached = torch.zeros(1, 4)
    out = put(cached, 1, torch.tensor([[1, 4, 4]]), torch.tensor([[5.0, 6.0, 7.0]]))
    assert out.tolist() == [[0.0, 5.0, 0.0, 0.0]] and suffix_width(3, True) == 4 and suffix_width(3, False) == 3


def test_without_slots_every_row_is_scratch_and_nothing_is_cached():
    cache = PrefixCache(0)
    assert cache.assign(["a", "a"], [b"1", b"1"]) == ([0, 0], [False, False]) and not cache.entries
    with pytest.raises(ValueError, match="capacity"):
        PrefixCache(-1)


def test_slot_pool_reads_back_what_a_prefill_wrote_and_reads_are_copies():
    pool = SlotPool(layers=2, slots=3, heads=2, positions=5, dqk=4, dv=3, device=torch.device("cpu"),
                    dtype=torch.float32)
    keys, values = torch.randn(2, 2, 2, 5, 4), torch.randn(2, 2, 2, 5, 3)
    times, valid = torch.arange(10).view(2, 5), torch.rand(2, 5) > 0.5
    slots = torch.tensor([2, 0])
    pool.write(slots, keys, values, times, valid)
    k1, v1 = pool.read(1, torch.tensor([0, 2]))
    torch.testing.assert_close(k1, keys[1].flip(0))
    torch.testing.assert_close(v1, values[1].flip(0))
    assert pool.times[2].tolist() == times[0].tolist() and pool.valid[0].tolist() == valid[1].tolist()
    k1.zero_()
    torch.testing.assert_close(pool.k[1, 0], keys[1, 1])
    assert pool.k.shape[1] == 4  # 3 slots + scratch


# ---- graph keys ------------------------------------------------------------------------------------------


def test_bucket_size_pads_to_the_next_bucket_only_with_graphs():
    assert [bucket_size(n, (8, 1, 32), padded=True) for n in (1, 2, 8, 9, 40)] == [1, 8, 8, 32, 40]
    assert bucket_size(3, (1, 8), padded=False) == 3 and bucket_size(1, (1, 8), padded=False, minimum=2) == 2


def test_batch_descriptors_key_one_graph_per_shape_and_stale_ones_are_dropped():
    a = BatchDescriptor("heads", 8, excl_width=8, k=10, catalog=(40, 1))
    assert a == BatchDescriptor("heads", 8, excl_width=8, k=10, catalog=(40, 1))
    others = [BatchDescriptor("heads", 32, excl_width=8, k=10, catalog=(40, 1)),
              BatchDescriptor("heads", 8, excl_width=16, k=10, catalog=(40, 1)),
              BatchDescriptor("heads", 8, excl_width=8, k=5, catalog=(40, 1)),
              BatchDescriptor("heads", 8, excl_width=8, k=10, catalog=(41, 1)),
              BatchDescriptor("rank", 8, candidates=100)]
    assert len({a, *others}) == 6
    dispatcher = GraphDispatcher(enabled=False, buckets=(1, 8))
    dispatcher.graphs.update({key: None for key in (a, *others)})  # no graphs on CPU: only the bookkeeping
    dispatcher.drop(lambda key: key.kind == "heads" and key.catalog != (41, 1))
    assert set(dispatcher.graphs) == {others[3], others[4]}


def test_a_disabled_dispatcher_runs_the_step_eagerly_and_captures_nothing():
    dispatcher = GraphDispatcher(enabled=False, buckets=(1, 8))
    out = dispatcher.run(BatchDescriptor("prefill", 3), lambda x: x * 2, torch.ones(3))
    assert out.tolist() == [2.0, 2.0, 2.0] and not dispatcher.graphs and dispatcher.bucket(3) == 3


# ---- retrieval and merge ---------------------------------------------------------------------------------


def test_retrieve_masks_padding_and_exclusions_and_counts_what_is_left():
    table = torch.nn.functional.normalize(torch.randn(11, 4), dim=-1)  # items 1..10; 8 served now
    user = table[[3, 5]] * 2
    excl = torch.tensor([[3, 0], [5, 6]])
    values, items, counts = retrieve(user, excl, table, num_items=8, k=20)
    assert items.shape == (2, 8) and counts.tolist() == [7, 6]
    for b in range(2):
        finite = items[b][torch.isfinite(values[b])].tolist()
        assert len(finite) == counts[b] and not set(finite) & ({0, 9, 10} | set(excl[b].tolist()))
        assert values[b].tolist() == sorted(values[b].tolist(), reverse=True)


def test_score_candidates_in_micro_batches_equals_one_pass():
    table, user = torch.randn(30, 8), torch.randn(3, 8)
    cands = torch.randint(1, 30, (3, 17))
    torch.testing.assert_close(score_candidates(user, cands, table, 4), (table[cands] * user[:, None]).sum(-1))
    with pytest.raises(ValueError, match="micro_batch"):
        score_candidates(user, cands, table, 0)


def test_rrf_merge_adds_reciprocal_ranks_and_ignores_banned_beam_items():
    ret = torch.tensor([[4, 2, 7]])
    gen = torch.tensor([[2, 9, 4]])
    logp = torch.tensor([[-1.0, float("-inf"), -2.0]])  # 9 was banned (excluded)
    values, items = rrf_merge(ret, gen, logp, num_items=10, k=4)
    r = [1 / (RRF_K + i) for i in (1, 2, 3)]
    assert items[0, :3].tolist() == [2, 4, 7]  # 2: ranks 2 and 1; 4: ranks 1 and 3; 7: rank 3 once
    torch.testing.assert_close(values[0, :3], torch.tensor([r[1] + r[0], r[0] + r[2], r[2]]))
    assert values[0, 3] == float("-inf")  # nothing else scored: no fourth item (9 was banned)


def test_union_candidates_drops_beam_items_retrieval_already_has():
    cands, invalid = torch.tensor([[5, 6]]), torch.tensor([[False, True]])
    union, bad = union_candidates(cands, invalid, torch.tensor([[6, 8, 9]]), torch.tensor([[-1.0, -2.0, -float("inf")]]))
    assert union.tolist() == [[5, 6, 0, 8, 0]] and bad.tolist() == [[False, True, True, False, True]]


def test_pending_on_cpu_answers_at_most_k_valid_items_per_row():
    values = torch.tensor([[0.9, 0.5, float("-inf")], [0.8, 0.7, 0.6]])
    items = torch.tensor([[3, 1, 2], [4, 5, 6]])
    pending = Pending.to_host(2, 3, values, items, torch.tensor([3, 2]))
    assert pending.ready() and pending.done is None
    got = pending.result()
    assert [g.indices.tolist() for g in got] == [[3, 1], [4, 5]]
    assert Pending.empty().result() == []
