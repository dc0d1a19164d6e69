"""The slot-pool attention kernel (models/kernels/slot_attention.py) against its PyTorch reference.

On a GPU the kernel runs compiled; on CPU under Triton's interpreter (TRITON_INTERPRET=1, set before the kernel is
first built). Shapes of the three cached steps: an append (S queries per row, each its own bias row), a decode
(S = 1) and ranking (C candidates sharing one expanded bias row), with rows in any order of slots.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from models.kernels.hstu_attention import triton_status  # noqa: E402
from models.kernels.slot_attention import reference_slot_attention, slot_attention  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
USABLE, WHY = triton_status(DEVICE)
needs_triton = pytest.mark.skipif(not USABLE, reason=f"slot attention kernel not runnable here: {WHY}")


def case(B=3, S=4, H=2, T=37, dqk=16, dv=24, R=6, shared=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, S, H, dqk, generator=g)
    k_pool, v_pool = torch.randn(R, H, T, dqk, generator=g), torch.randn(R, H, T, dv, generator=g)
    slots = torch.stack([torch.randperm(R, generator=g)[:B], torch.zeros(B, dtype=torch.long)], 1)[:, 0]  # a column
    rows = 1 if shared else S
    mask = torch.rand(B, rows, T, generator=g) > 0.3
    pos_index = torch.randint(0, 2 * T - 1, (B, rows, T), generator=g)
    buckets = torch.randint(0, 9, (B, rows, T), generator=g)
    if shared:  # one row per user, expanded over the candidates: stride 0, no copy
        mask, pos_index, buckets = (t.expand(B, S, T) for t in (mask, pos_index, buckets))
    pos_w, ts_w = torch.randn(2 * T - 1, generator=g) * 0.3, torch.randn(9, generator=g) * 0.3
    args = (q, k_pool, v_pool, slots, mask, pos_index, buckets, pos_w, ts_w, 40.0)
    return tuple(t.to(DEVICE) if isinstance(t, torch.Tensor) else t for t in args)


@needs_triton
@pytest.mark.parametrize("S, shared", [(4, False), (1, False), (21, True)])
def test_the_kernel_reads_the_pool_in_place_as_the_reference_copies_it(S, shared):
    args = case(S=S, shared=shared)
    got = slot_attention(*args)
    want = reference_slot_attention(*args)
    assert got.shape == want.shape == (3, S, 2 * 24)
    assert (got - want).abs().max() < 1e-4


@needs_triton
def test_a_masked_key_and_another_slot_change_nothing():
    """Keys outside the mask and slots no row names are never read: changing them leaves the output bit for bit."""
    q, k_pool, v_pool, slots, mask, pos_index, buckets, pos_w, ts_w, norm = case()
    before = slot_attention(q, k_pool, v_pool, slots, mask, pos_index, buckets, pos_w, ts_w, norm)
    other = [r for r in range(k_pool.shape[0]) if r not in slots.tolist()]
    k2, v2 = k_pool.clone(), v_pool.clone()
    k2[other], v2[other] = 1e3, -1e3
    hidden = ~mask[0, 0]
    k2[slots[0], :, hidden] = 7.0  # row 0's first query cannot see these (every query row masks differently)
    after = slot_attention(q[:, :1], k2, v2, slots, mask[:, :1], pos_index[:, :1], buckets[:, :1], pos_w, ts_w, norm)
    assert torch.equal(after[0], before[:, :1][0])


@needs_triton
def test_bad_shapes_are_refused_with_what_was_expected():
    q, k_pool, v_pool, slots, mask, pos_index, buckets, pos_w, ts_w, norm = case()
    with pytest.raises(ValueError, match="must be"):
        slot_attention(q, k_pool, v_pool, slots, mask[:, :2], pos_index, buckets, pos_w, ts_w, norm)


@needs_triton
@pytest.mark.parametrize("rank_top", [0, 6])
def test_an_engine_that_reads_the_pool_in_place_answers_as_one_that_copies_it(rank_top):
    """``paged_attention``: the append, decode and ranking steps through the kernel give the copying engine's
    answers (fp32, scores within 1e-4, the same top-k) over misses, then appends, hits and misses in one batch,
    then a batch of hits alone (the compact decode)."""
    from models.ugt.inference import InferenceConfig, UGTInference
    from tests.models.test_inference import excludes_of
    from tests.models.test_kv_append import assert_same_answers, histories, row_of
    from tests.models.test_ranking import make_model as ranked_model

    model = ranked_model(2, long_groups=3)
    cfg = {"device": str(DEVICE), "dtype": "fp32", "rank_top": rank_top, "batch_buckets": (1, 8), "cache_slots": 8}
    paged = UGTInference(model, InferenceConfig(**cfg, paged_attention=True))
    copying = UGTInference(model, InferenceConfig(**cfg))
    assert paged.stack.paged and not copying.stack.paged
    users = histories(6, seed=23)
    keys = [f"u{i}" for i in range(6)]
    batches = [[(0, 3, 0), (1, 5, 0), (2, 7, 0), (3, 2, 0)],  # misses
               [(0, 5, 60), (1, 5, 60), (2, 9, 60), (3, 2, 60), (4, 6, 60), (5, 4, 60)],  # appends, hits, misses
               [(0, 5, 900), (1, 5, 900), (4, 6, 900)]]  # hits alone
    for batch in batches:
        rows = [row_of(users[u], n, later) for u, n, later in batch]
        names = [keys[u] for u, _, _ in batch]
        got = paged.recommend(rows, excludes_of(rows), 6, names)
        assert_same_answers(got, copying.recommend(rows, excludes_of(rows), 6, names), 1e-4)
    assert paged.cache.stats() == copying.cache.stats()


def test_paged_attention_without_a_kv_cache_is_refused_at_start():
    from models.ugt.inference import InferenceConfig, UGTInference
    from tests.models.test_ranking import make_model as ranked_model

    with pytest.raises(ValueError, match="paged_attention"):
        UGTInference(ranked_model(2), InferenceConfig(device="cpu", paged_attention=True))
