"""Every metric against a hand-computed case."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from models import metrics as m


def test_ranks_mask_history_and_count_ties_against_target():
    scores = torch.tensor([[0.0, 0.9, 0.5, 0.7, 0.5], [0.0, 0.1, 0.1, 0.1, 0.1]])
    invalid = torch.zeros(2, 5, dtype=torch.bool)
    invalid[0, 1] = True  # item 1 is history: masked
    invalid[:, 0] = True
    ranks = m.ranks_from_scores(scores, torch.tensor([2, 3]), invalid)
    assert ranks.tolist() == [3, 4]  # 0.7 > 0.5 = 0.5 (tie counts against) ; all tied -> last


def test_accuracy_from_ranks_by_hand():
    out = m.accuracy_from_ranks(np.array([1, 3, 20, 100]), ks=(10, 50))
    assert out["hr@10"] == pytest.approx(0.5)
    assert out["hr@50"] == pytest.approx(0.75)
    assert out["ndcg@10"] == pytest.approx((1.0 + 1 / math.log2(4)) / 4)
    assert out["ndcg@50"] == pytest.approx((1.0 + 0.5 + 1 / math.log2(21)) / 4)
    assert out["mrr"] == pytest.approx((1 + 1 / 3 + 1 / 20 + 1 / 100) / 4)
    with pytest.raises(ValueError):
        m.accuracy_from_ranks(np.array([0, 1]))


TOP = np.array([[1, 2], [1, 3]])  # two lists over a 4-item catalog (indices 1..4)
GENRES = np.array([[0, 0], [1, 0], [1, 2], [3, 0], [2, 0]])  # item -> genre ids (+1), 3 genres


def test_beyond_accuracy_by_hand():
    assert m.coverage(TOP, 4) == pytest.approx(3 / 4)
    # counts over items 1..4 = [2, 1, 1, 0] -> p = [.5, .25, .25]: H = 1.5 bits
    assert m.entropy(TOP, 4) == pytest.approx(1.5)
    # Gini of sorted counts [0, 1, 1, 2]: sum((2i - n - 1) c) / (n sum c) = (-3*0 - 1*1 + 1*1 + 3*2) / (4*4)
    assert m.gini(TOP, 4) == pytest.approx(6 / 16)
    # genre diversity: list 1 genres {1, 2} -> 2/3; list 2 {1, 3} -> 2/3
    assert m.genre_diversity(TOP, GENRES) == pytest.approx(2 / 3)
    # genre ILD: item1 {1} vs item2 {1,2}: 1 - 1/2; item1 vs item3 {3}: 1 - 0
    assert m.genre_ild(TOP, GENRES) == pytest.approx((0.5 + 1.0) / 2)
    pop = np.array([0, 6, 2, 1, 1])  # padding, then counts; add-one smoothing over 5 slots
    p = (pop + 1) / (pop.sum() + 5)
    assert m.novelty(TOP, pop) == pytest.approx(float(-np.log2(p[TOP]).mean()))
    # head = top 20% of 4 items by popularity = 1 item (item 1): 2 of 4 slots are long tail
    assert m.long_tail_share(TOP, pop) == pytest.approx(0.5)


def test_embedding_ild_by_hand():
    vectors = np.array([[0, 0], [1, 0], [0, 1], [1, 1]], dtype=float)
    # item1 . item2 orthogonal -> distance 1; item1 . item3 cos 1/sqrt2
    got = m.intra_list_distance(TOP, vectors)
    assert got == pytest.approx((1.0 + (1 - 1 / math.sqrt(2))) / 2)
