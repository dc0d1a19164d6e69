"""The similar-items index (models/similar) on a synthetic catalog: vectors, recall against exact search, new
items, and the artifact's checks."""

from __future__ import annotations

import json

import numpy as np
import pytest

from models.similar import (
    IndexConfig,
    ItemTables,
    SimilarIndex,
    SimilarIndexError,
    VectorWeights,
    exact_top,
    recall_at_k,
)
from models.similar.vectors import combine

ITEMS, DIM, SIZES = 3000, 16, [8, 8]


def synthetic_tables(seed: int = 0) -> ItemTables:
    """3,000 items in 60 clusters (ID rows near their cluster's centre), two-level codes, genres and decades."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(60, DIM)).astype(np.float32)
    cluster = rng.integers(0, 60, ITEMS + 1)
    collab = centres[cluster] + 0.3 * rng.normal(size=(ITEMS + 1, DIM)).astype(np.float32)
    collab[0] = 0
    codes = np.stack([cluster % 8, cluster // 8 % 8], axis=1) + np.array([0, 8]) + 1  # shifted: 1..16
    codes[0] = 0
    genres = rng.integers(0, 4, (ITEMS + 1, 2))
    years = rng.integers(1, 5, ITEMS + 1)
    return ItemTables(
        item_ids=[f"i{i}" for i in range(1, ITEMS + 1)], collab=collab,
        genre_table=np.vstack([np.zeros((1, DIM)), rng.normal(size=(3, DIM))]).astype(np.float32), genres=genres,
        year_table=np.vstack([np.zeros((1, DIM)), rng.normal(size=(4, DIM))]).astype(np.float32), years=years,
        code_table=np.vstack([np.zeros((1, DIM)), rng.normal(size=(16, DIM))]).astype(np.float32), codes=codes,
        codebook_sizes=SIZES, genre_names=["Action", "Comedy", "Drama"], sid_version="v1")


@pytest.fixture(scope="module")
def tables() -> ItemTables:
    return synthetic_tables()


@pytest.fixture(scope="module")
def hnsw(tables) -> SimilarIndex:
    return SimilarIndex.build(tables, config=IndexConfig(kind="hnsw", hnsw_m=16, ef_search=64))


def test_vectors_are_unit_and_mix_both_halves(tables, hnsw):
    assert hnsw.vectors.shape == (ITEMS, 2 * DIM)
    np.testing.assert_allclose(np.linalg.norm(hnsw.vectors, axis=1), 1.0, rtol=1e-5)
    half = np.linalg.norm(hnsw.vectors[:, :DIM], axis=1)  # equal weights: each half is 1/sqrt(2) long
    np.testing.assert_allclose(half, 1 / np.sqrt(2), rtol=1e-4)
    only_collab = combine(tables.collab[1:4], np.zeros((3, DIM)), VectorWeights(collab=1.0, content=0.0))
    assert not only_collab[:, DIM:].any()


def test_hnsw_recall_at_10_against_exact_search(hnsw):
    queries = hnsw.vectors[::7]
    exact = exact_top(hnsw.vectors, queries, 10)
    found = hnsw.search(queries, 10)[1]
    recall = recall_at_k(found, exact)
    assert recall >= 0.95, recall
    assert recall_at_k(exact, exact) == 1.0
    shuffled = np.random.default_rng(1).integers(0, ITEMS, exact.shape)
    assert recall_at_k(shuffled, exact) < 0.05  # the measure can fail


def test_ivf_with_every_list_probed_is_exact_and_flat_is_exact(tables):
    queries = None
    for config in (IndexConfig(kind="ivf", ivf_lists=16, ivf_probe=16), IndexConfig(kind="flat")):
        index = SimilarIndex.build(tables, config=config)
        queries = index.vectors[::11]
        assert recall_at_k(index.search(queries, 10)[1], exact_top(index.vectors, queries, 10)) >= 0.999
    few = SimilarIndex.build(tables, config=IndexConfig(kind="ivf", ivf_lists=64, ivf_probe=1))
    assert recall_at_k(few.search(queries, 10)[1], exact_top(few.vectors, queries, 10)) < 0.999


def test_neighbours_skip_the_item_and_exclusions_best_first(hnsw):
    got = hnsw.neighbours("i5", 10)
    assert len(got) == 10 and "i5" not in [i for i, _ in got]
    scores = [s for _, s in got]
    assert scores == sorted(scores, reverse=True)
    exact = exact_top(hnsw.vectors, hnsw.vectors[4:5], 11)[0].tolist()
    assert len({hnsw.item_ids[p] for p in exact} & {i for i, _ in got}) >= 9
    fewer = hnsw.neighbours("i5", 10, exclude={got[0][0], got[1][0]})
    assert [i for i, _ in fewer[:8]] == [i for i, _ in got[2:]]
    with pytest.raises(KeyError):
        hnsw.neighbours("nope", 3)


def test_a_new_item_is_placed_by_content_beside_items_with_its_codes(tables):
    index = SimilarIndex.build(tables, config=IndexConfig(kind="flat"))
    row = 7
    codes = (tables.codes[row] - np.array([0, 8]) - 1)[None]  # unshifted codes of trained item i7
    assert index.add_new_items(["new"], codes, tables.genres[row][None], tables.years[row][None]) == 1
    assert index.add_new_items(["new", "i3"], codes.repeat(2, 0), np.zeros((2, 2), int), np.zeros(2, int)) == 0
    vector = index.vectors[index.position["new"]]
    assert not vector[:DIM].any()  # no ID row: a zero collaborative half
    content = tables.content(tables.codes[1:], tables.genres[1:], tables.years[1:])
    same = np.isclose(content, content[row - 1], atol=1e-5).all(axis=1)  # i7 and any item described alike
    same_content = {f"i{i + 1}" for i in np.flatnonzero(same)}
    assert "i7" in same_content
    top = index.neighbours("new", len(same_content) + 1)
    assert {i for i, _ in top[: len(same_content)]} == same_content
    assert top[-1][1] < top[0][1] - 1e-4  # the next one is further away


def test_codes_no_trained_item_has_are_dropped(tables):
    thin = ItemTables(**{**tables.__dict__, "codes": tables.codes.copy()})
    thin.codes[thin.codes[:, 1] == 16, 1] = 15  # no trained item keeps second-level code 7 (row 16)
    shifted = thin.shift_codes(np.array([[1, 7], [1, 6]]))
    assert shifted.tolist() == [[2, 0], [2, 15]]


def test_the_artifact_round_trips_and_refuses_damage(tables, hnsw, tmp_path):
    folder = hnsw.save(tmp_path / "idx")
    loaded = SimilarIndex.load(folder)
    assert loaded.item_ids == hnsw.item_ids and loaded.config == hnsw.config
    assert loaded.neighbours("i42", 10) == hnsw.neighbours("i42", 10)
    assert loaded.tables.embeds_new_items and loaded.tables.sid_version == "v1"

    arrays = folder / "arrays.npz"
    arrays.write_bytes(arrays.read_bytes()[:-100])
    with pytest.raises(SimilarIndexError, match="arrays.npz does not match its checksum"):
        SimilarIndex.load(folder)
    hnsw.save(folder)
    (folder / "index.faiss").unlink()
    with pytest.raises(SimilarIndexError, match="index.faiss is missing"):
        SimilarIndex.load(folder)
    hnsw.save(folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps({**manifest, "format": "other/9"}))
    with pytest.raises(SimilarIndexError, match="format 'other/9'"):
        SimilarIndex.load(folder)
    (folder / "manifest.json").write_text("{not json")
    with pytest.raises(SimilarIndexError, match="not JSON"):
        SimilarIndex.load(folder)
    with pytest.raises(SimilarIndexError, match="does not exist"):
        SimilarIndex.load(tmp_path / "absent")
