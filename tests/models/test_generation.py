"""Prefix trie + constrained beam search over semantic IDs (synthetic codes)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from models.ugt.heads import PrefixTrie, SemanticIDHead
from models.ugt.model import UGT, UGTConfig

SIZES = [4, 3, 5]


def _codes(n: int = 25, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    every = np.array(list(itertools.product(*[range(k) for k in SIZES])))
    return every[rng.choice(len(every), n, replace=False)]


def test_trie_tables():
    codes = _codes()
    trie = PrefixTrie(codes, SIZES)
    assert trie.allowed[0].shape == (1, 4)
    assert set(torch.nonzero(trie.allowed[0][0]).flatten().tolist()) == set(codes[:, 0].tolist())
    assert sorted(trie.leaf_item.tolist()) == list(range(1, len(codes) + 1))
    with pytest.raises(ValueError):
        PrefixTrie(np.vstack([codes, codes[:1]]), SIZES)  # duplicate IDs
    with pytest.raises(ValueError):
        PrefixTrie(codes + 10, SIZES)  # out of codebook range


def test_beam_search_returns_only_valid_items_and_matches_brute_force():
    torch.manual_seed(0)
    codes = _codes()
    trie = PrefixTrie(codes, SIZES)
    head = SemanticIDHead(8, SIZES).eval()
    h = torch.randn(3, 8)
    items, scores = head.beam_search(h, trie, beam_size=10)
    assert ((items >= 1) & (items <= len(codes))).all()
    assert (scores[:, :-1] >= scores[:, 1:]).all()
    # Scores are the exact log-probabilities of the returned items' IDs.
    for b in range(3):
        lp = head.log_prob(h[b : b + 1].expand(10, -1), torch.as_tensor(codes[items[b] - 1]))
        assert torch.allclose(lp, scores[b], atol=1e-5)
    # With beams >= catalog size the search is exhaustive: same ranking as scoring every item.
    items_all, _ = head.beam_search(h, trie, beam_size=len(codes) * 5)
    for b in range(3):
        lp = head.log_prob(h[b : b + 1].expand(len(codes), -1), torch.as_tensor(codes))
        brute = (torch.argsort(lp, descending=True) + 1)[:10]
        assert items_all[b, :10].tolist() == brute.tolist()


def _members(trie: PrefixTrie) -> dict[tuple[int, ...], int]:
    """Every full path through the tables -> its item (what beam search can reach)."""
    out, frontier = {}, [((), 0)]
    for level in range(trie.num_levels):
        nxt = []
        for prefix, node in frontier:
            for code in torch.nonzero(trie.allowed[level][node]).flatten().tolist():
                nxt.append(((*prefix, code), int(trie.child[level][node, code])))
        frontier = nxt
    for code, node in frontier:
        out[code] = int(trie.leaf_item[node])
    return out


@pytest.mark.parametrize("split", [0, 1, 20, 59])
def test_a_trie_grown_in_place_holds_what_a_rebuild_holds(split: int):
    """The live catalog grows its trie a few items at a time: with_room + add answer as a rebuild over every code
    does (beam search included), the edits replayed on a copy give the same tables, and the original is untouched."""
    codes = _codes(n=60, seed=3)
    index = np.arange(1, 61) * 7  # item indices need not be 1..n
    base = PrefixTrie(codes[:split], SIZES, item_index=index[:split])
    before = _members(base)
    grown = base.with_room(60 - split)
    replica = base.with_room(60 - split)  # the engine's copy: it only ever sees the edits
    for chunk in np.array_split(np.arange(split, 60), 3):
        if len(chunk):
            replica.apply(grown.add(codes[chunk], index[chunk]))
    rebuilt = PrefixTrie(codes, SIZES, item_index=index)
    assert _members(grown) == _members(rebuilt) == {tuple(c): int(i) for c, i in zip(codes.tolist(), index, strict=True)}
    for mine, theirs in ((grown.allowed, replica.allowed), (grown.child, replica.child)):
        assert all(torch.equal(x, y) for x, y in zip(mine, theirs, strict=True))
    assert torch.equal(grown.leaf_item, replica.leaf_item) and grown.used_nodes() == replica.used_nodes()
    assert _members(base) == before
    torch.manual_seed(1)
    head = SemanticIDHead(8, SIZES).eval()
    h = torch.randn(4, 8)
    for beams in (5, 300):
        a_items, a_scores = head.beam_search(h, grown, beams)
        b_items, b_scores = head.beam_search(h, rebuilt, beams)
        assert torch.equal(a_items, b_items) and torch.allclose(a_scores, b_scores)


def test_growing_a_trie_checks_codes_and_room_and_changes_nothing_on_failure():
    codes = _codes(n=10)
    trie = PrefixTrie(codes, SIZES).with_room(2)
    tables = [t.clone() for t in (*trie.allowed, *trie.child, trie.leaf_item)]
    with pytest.raises(ValueError, match="in the trie already"):
        trie.add(codes[3:4], np.array([99]))
    extra = [c for c in _codes(n=60, seed=5).tolist() if c not in codes.tolist()]
    with pytest.raises(ValueError, match="not unique"):
        trie.add(np.array([extra[0], extra[0]]), np.array([98, 99]))
    with pytest.raises(ValueError, match="range"):
        trie.add(codes[:1] + 10, np.array([99]))
    with pytest.raises(ValueError, match="no room"):
        trie.add(np.array(extra[:3]), np.array([97, 98, 99]))
    assert all(torch.equal(a, b) for a, b in zip(tables, (*trie.allowed, *trie.child, trie.leaf_item), strict=True))
    trie.add(np.array(extra[:2]), np.array([98, 99]))
    assert _members(trie)[tuple(extra[1])] == 99


def test_beam_search_pads_when_fewer_items_than_beams():
    codes = _codes(n=3)
    trie = PrefixTrie(codes, SIZES)
    items, scores = SemanticIDHead(8, SIZES).eval().beam_search(torch.randn(2, 8), trie, beam_size=6)
    assert (items[:, :3] > 0).all() and (items[:, 3:] == 0).all() and torch.isinf(scores[:, 3:]).all()


def test_ugt_generate_uses_its_catalog(tiny_data, tiny_batch):
    n = tiny_data.num_items
    codes = np.zeros((n + 1, 3), np.int64)
    codes[1:] = _codes(n=n)
    cfg = UGTConfig.from_dict({"num_items": n, "d_model": 16, "num_layers": 1, "num_heads": 1, "dqk": 8, "dv": 8,
                               "multiscale": {"recent_len": 10, "long_groups": 2, "max_long": 8},
                               "embedding": {"item_repr": "id+sid"}})
    model = UGT(cfg, tiny_data.item_genres, tiny_data.item_year_bucket, codes, SIZES).eval()
    with torch.no_grad():
        user, _ = model(tiny_batch)
        items, _ = model.generate(user[:, 0], beam_size=5)
    assert ((items >= 1) & (items <= n)).all()
