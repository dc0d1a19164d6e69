"""Blocked exact top-k retrieval (models/ugt/runner/blocked_topk.py) gives the plain one-pass path's answer.

Random float scores (no ties), so "the same answer" is checked strictly: the same values and, where a value is
finite, the same items; a -inf value (a row with fewer than k valid items) carries a placeholder index in both.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.ugt.inference import InferenceConfig, UGTInference
from models.ugt.runner.blocked_topk import BlockMask, block_bounds, blocked_topk
from models.ugt.runner.config import RETRIEVAL_BLOCK
from models.ugt.runner.retrieval import retrieve
from tests.models.test_inference import excludes_of, make_model, user_rows


def exclusions(rows: int, num_items: int, width: int, gen: torch.Generator) -> torch.Tensor:
    """(rows, width) unique item indices per row, padded with 0 (some rows shorter than others)."""
    out = torch.zeros(rows, width, dtype=torch.long)
    for r in range(rows):
        n = int(torch.randint(0, min(width, num_items) + 1, (1,), generator=gen))
        out[r, :n] = torch.randperm(num_items, generator=gen)[:n] + 1
    return out[:, torch.randperm(width, generator=gen)]  # padding anywhere in the row


def assert_same_answer(excl: torch.Tensor, num_items: int, plain, blocked) -> None:
    """Equal values; equal item sets where finite; never padding, an excluded or an unserved item when finite."""
    (pv, pi, pc), (bv, bi, bc) = plain, blocked
    torch.testing.assert_close(bv, pv, rtol=0, atol=1e-6)
    assert torch.equal(bc, pc) and bi.shape == pi.shape
    assert int(bi.min()) >= 0 and int(bi.max()) <= num_items
    for b in range(pv.shape[0]):
        finite = torch.isfinite(pv[b])
        assert torch.equal(torch.isfinite(bv[b]), finite)
        got = set(bi[b][finite].tolist())
        assert got == set(pi[b][finite].tolist())
        assert len(got) == min(int(pc[b]), pv.shape[1])
        assert not got & ({0} | set(excl[b].tolist()))


# (batch, items served, table rows, block, k, exclusion width)
SHAPES = [
    (4, 100, 101, 16, 10, 8),  # 101 columns: not a multiple of the block
    (3, 50, 51, 4, 10, 6),  # k larger than a block
    (5, 64, 65, 65, 7, 3),  # one block exactly the catalog
    (2, 30, 61, 8, 5, 10),  # the table has 30 spare rows past the served items
    (6, 257, 300, 32, 100, 40),  # k = 100 over 9 blocks, a grown catalog
    (3, 20, 21, 6, 25, 12),  # k past the catalog: -inf tails
    (1, 1, 2, 1, 3, 1),  # one item
]


@pytest.mark.parametrize(("batch", "num_items", "rows", "block", "k", "width"), SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_blocked_equals_the_plain_path(batch, num_items, rows, block, k, width, dtype):
    gen = torch.Generator().manual_seed(num_items * 7 + block)
    table = torch.nn.functional.normalize(torch.randn(rows, 16, generator=gen), dim=-1).to(dtype)
    table[num_items + 1 :] = 10.0  # spare rows score highest: they must never be read
    user = torch.randn(batch, 16, generator=gen)
    excl = exclusions(batch, num_items, width, gen)
    plain = retrieve(user, excl, table, num_items, k)
    blocked = retrieve(user, excl, table, num_items, k, block)
    if dtype == torch.bfloat16:  # bf16 scores tie: only the values are the same answer
        torch.testing.assert_close(blocked[0], plain[0], rtol=0, atol=0)
        assert int(blocked[1].max()) <= num_items
        return
    assert_same_answer(excl, num_items, plain, blocked)


def test_a_block_emptied_by_exclusions_and_row_zero_never_returned():
    gen = torch.Generator().manual_seed(3)
    num_items, block = 40, 8
    table = torch.nn.functional.normalize(torch.randn(num_items + 1, 8, generator=gen), dim=-1)
    user = table[[9, 12, 0]] * 3  # rows 0 and 1 point at items in block 1 (items 8..15), row 2 at the padding row
    table[0] = table[9] * 5  # the padding row would win every row if it were scored
    excl = torch.zeros(3, 12, dtype=torch.long)
    excl[0, :8] = torch.arange(8, 16)  # row 0: all of block 1 excluded
    excl[1, :] = torch.tensor([1, 2, 3, 4, 5, 6, 7, 17, 18, 19, 20, 21])  # row 1: all of block 0 but the padding
    plain = retrieve(user, excl, table, num_items, 10)
    blocked = retrieve(user, excl, table, num_items, 10, block)
    assert_same_answer(excl, num_items, plain, blocked)
    assert not set(blocked[1][0].tolist()) & set(range(8, 16))
    assert 0 not in blocked[1].tolist()


def test_block_mask_masks_only_its_own_columns_whatever_the_duplicates():
    excl = torch.tensor([[0, 3, 11, 12, 25], [13, 14, 0, 0, 1]])  # blocks of 10 items: 0..9, 10..19, 20..29
    mask = BlockMask(excl, 10, torch.float32)
    inf = float("-inf")
    scores = torch.arange(12, dtype=torch.float32).reshape(2, 6)  # block 1
    mask.apply(scores, 1)
    assert scores.tolist() == [[0, inf, inf, 3, 4, 5], [6, 7, 8, inf, inf, 11]]
    last = torch.arange(12, dtype=torch.float32).reshape(2, 6)  # block 2, 6 columns wide (items 20..25)
    mask.apply(last, 2)
    assert last.tolist() == [[0, 1, 2, 3, 4, inf], [6, 7, 8, 9, 10, 11]]
    short = torch.zeros(1, 4)  # a last block of 4 columns (items 20..23): 19 and 9 clamp onto column 3, kept
    BlockMask(torch.tensor([[19, 21, 9]]), 10, torch.float32).apply(short, 2)
    assert short.tolist() == [[0, inf, 0, 0]]
    first = torch.zeros(2, 10)
    mask.apply(first, 0)
    assert first[0].tolist() == [inf, 0, 0, inf] + [0] * 6 and first[1].tolist() == [inf, inf] + [0] * 8


def test_block_bounds_cover_every_column_once():
    assert block_bounds(10, 4) == [(0, 4), (4, 8), (8, 11)]
    assert block_bounds(3, 8) == [(0, 4)]
    with pytest.raises(ValueError, match="block must be > 0"):
        block_bounds(10, 0)


def test_blocked_topk_alone_returns_the_table_dtype():
    table = torch.randn(33, 4).to(torch.bfloat16)
    values, indices = blocked_topk(torch.randn(2, 4), torch.zeros(2, 1, dtype=torch.long), table, 32, 5, 8)
    assert values.dtype == torch.bfloat16 and indices.shape == (2, 5)


def test_the_config_switches_blocks_on_for_large_catalogs_and_batches_and_refuses_negatives():
    config = InferenceConfig(retrieval_block=1024, retrieval_block_min_batch=32)
    assert config.retrieval_block_for(64, 3_883) == 1024 and config.retrieval_block_for(64, 1_000) == 0
    assert config.retrieval_block_for(8, 1_000_000) == 0 and config.retrieval_block_for(32, 1_000_000) == 1024
    assert InferenceConfig(retrieval_block=0, retrieval_block_min_batch=0).retrieval_block_for(512, 10**6) == 0
    assert InferenceConfig(device="cpu").retrieval_block_for(512, 10**6) == RETRIEVAL_BLOCK["cpu"]
    assert InferenceConfig(device="cpu").retrieval_block_for(512, 3_883) == 0  # ML-1M: one pass
    with pytest.raises(ValueError, match="retrieval_block"):
        UGTInference(make_model(), InferenceConfig(retrieval_block=-1))


def test_the_engine_retrieves_in_blocks_when_configured(monkeypatch):
    """An engine over a 40-item catalog in blocks of 7 answers recommend() as the one-pass engine does."""
    from models.ugt.runner import retrieval

    calls = []
    monkeypatch.setattr(retrieval, "blocked_topk", lambda *a: calls.append(a[-1]) or blocked_topk(*a))
    model = make_model(4)
    rows = user_rows(5, seed=8)
    one_pass = UGTInference(model, InferenceConfig(device="cpu", dtype="fp32", retrieval_block=0))
    blocks = UGTInference(model, InferenceConfig(device="cpu", dtype="fp32", retrieval_block=7,
                                                 retrieval_block_min_batch=1))
    want = one_pass.recommend(rows, excludes_of(rows), 12)
    assert not calls
    got = blocks.recommend(rows, excludes_of(rows), 12)
    assert calls and set(calls) == {7}
    for g, w in zip(got, want, strict=True):
        assert g.indices.tolist() == w.indices.tolist()
        np.testing.assert_allclose(g.scores, w.scores, rtol=0, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_blocked_on_cuda_bf16_captured_as_a_graph_gives_the_eager_answer():
    """The engine replays retrieval inside CUDA graphs: the blocked path captures (no host sync or copy) and its
    replay answers as it does eagerly, and as the plain path does (values)."""
    from models.ugt.runner.graphs import capture, replay

    gen = torch.Generator().manual_seed(5)
    num_items, k = 5000, 20
    table = torch.nn.functional.normalize(torch.randn(num_items + 50, 32, generator=gen), dim=-1).cuda().bfloat16()
    user = torch.randn(8, 32, generator=gen).cuda()
    excl = exclusions(8, num_items, 64, gen).cuda()
    plain = retrieve(user, excl, table, num_items, k)
    eager = retrieve(user, excl, table, num_items, k, 512)
    captured = capture(lambda u, x: retrieve(u, x, table, num_items, k, 512), user, excl)
    replayed = replay(captured, user, excl)
    torch.testing.assert_close(eager[0], plain[0], rtol=0, atol=0)
    for got, want in zip(replayed, eager, strict=True):
        assert torch.equal(got, want)
    assert int(eager[1].max()) <= num_items and not set(eager[1].flatten().tolist()) & {0}
    assert not (eager[1][:, :, None] == excl[:, None, :]).any()  # excl's 0 padding is never returned either
