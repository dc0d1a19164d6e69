"""GET /similar, the similar-items candidate source and first-session users, with a real tiny UGT (ML-100K, one
epoch on 400 users, ~20 s once per module) and its index built by `ugt similar build`; fakes for the state store
and popularity only."""

from __future__ import annotations

import json
import os
import signal
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from serving_fakes import FakeClock, FakeStateReader, FakeZsetRedis, view

from infra.settings import Settings
from models.similar import ItemTables, SimilarIndex
from serving.app import create_app
from serving.compose import _similar
from serving.config import ConfigError, ServingConfig, build_config
from serving.fallback import PopularityFallback
from serving.generator import ScoredItem
from serving.reranker import FilterReranker
from serving.service import Components
from serving.similar import SimilarItems, UnknownItem, merge_by_rank
from serving.ugt_generator import UGTGenerator
from ugt.cli import main as ugt_main


@pytest.fixture(scope="module")
def index_dir(trained, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("similar") / "idx"
    assert ugt_main(["similar", "build", "--checkpoint", str(trained), "--out", str(out), "--quiet"]) == 0
    return out


@pytest.fixture(scope="module")
def generator(trained) -> UGTGenerator:
    return UGTGenerator(trained)


def app_with(generator, index_dir, states=None, similar=None, **keys):
    vocab = generator.index_to_item[1:]
    redis = FakeZsetRedis({"ugt:popularity:movie": {item: 1000 - i for i, item in enumerate(vocab[:300])}})
    config = replace(ServingConfig(generator="ugt", checkpoint=str(generator.path)), **keys)
    parts = Components(
        state_reader=FakeStateReader(states or {}), generator=generator,
        fallback=PopularityFallback(redis, clock=FakeClock()), reranker=FilterReranker(),
        similar=similar if similar is not None else (SimilarItems.load(index_dir) if keys.get("similar_index")
                                                     else None))
    return TestClient(create_app(config=config, components=parts, client=redis))


def test_similar_route_answers_known_items_and_names_what_is_wrong(generator, index_dir):
    client = app_with(generator, index_dir, similar_index=str(index_dir))
    item = generator.index_to_item[10]
    r = client.get(f"/similar/{item}", params={"k": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    index = SimilarIndex.load(index_dir)
    assert body["item_id"] == item and body["model"].startswith("similar-")
    assert [(i["item_id"], pytest.approx(i["score"])) for i in body["items"]] == index.neighbours(item, 5)
    assert item not in [i["item_id"] for i in body["items"]]
    assert len(client.get(f"/similar/{item}").json()["items"]) == 10  # k defaults to 10

    missing = client.get("/similar/no-such-movie")
    assert missing.status_code == 404 and missing.json()["error"] == "not_found"
    assert "item 'no-such-movie' is not in the similar-items index" in missing.json()["message"]
    for bad in ("0", "1001", "ten", "-3"):
        r = client.get(f"/similar/{item}", params={"k": bad})
        assert r.status_code == 422 and r.json()["message"].startswith("k: "), (bad, r.text)
    metrics = client.get("/metrics").text
    assert 'ugt_serving_requests_total{endpoint="/similar",status="404"} 1.0' in metrics
    assert f"ugt_serving_similar_items {float(generator.num_items)}" in metrics


def test_similar_route_without_an_index_or_key_is_refused(generator, index_dir):
    r = app_with(generator, index_dir).get("/similar/1")
    assert r.status_code == 404 and "set the serving key similar_index" in r.json()["message"]
    keyed = app_with(generator, index_dir, similar_index=str(index_dir), api_keys=("secret-key-1",))
    assert keyed.get("/similar/1").status_code == 401
    assert keyed.get("/similar/1", headers={"x-api-key": "secret-key-1"}).status_code == 200


def test_a_missing_or_corrupt_index_stops_the_start(index_dir, tmp_path):
    with pytest.raises(ConfigError, match="similar_index: no such folder"):
        build_config({"similar_index": str(tmp_path / "absent")}, env={})
    with pytest.raises(ConfigError, match="similar_candidates: needs similar_index"):
        build_config({"similar_candidates": 10}, env={})
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("manifest.json", "index.faiss", "arrays.npz"):
        (broken / name).write_bytes((index_dir / name).read_bytes())
    (broken / "index.faiss").write_bytes(b"not faiss")
    config = build_config({"similar_index": str(broken)}, env={})
    with pytest.raises(ConfigError, match="similar_index: .*index.faiss does not match its checksum"):
        _similar(config, Settings())
    (broken / "manifest.json").unlink()
    with pytest.raises(ConfigError, match="has no manifest.json"):
        _similar(config, Settings())


def test_a_new_user_with_context_gets_the_model_not_popularity(generator, index_dir):
    client = app_with(generator, index_dir)
    session = [generator.index_to_item[i] for i in (5, 17)]
    body = client.post("/recommend", json={"user_id": "first-visit", "k": 10, "context": session}).json()
    assert body["fallback"] is False and body["model"].startswith("ugt-"), body
    items = [i["item_id"] for i in body["items"]]
    assert len(items) == 10 and not set(items) & set(session)
    cold = client.post("/recommend", json={"user_id": "first-visit", "k": 10}).json()
    assert cold["fallback"] is True and cold["fallback_reason"] == "unknown_user"
    assert [i["item_id"] for i in cold["items"]] != items


def test_first_sessions_merge_the_neighbours_of_their_items(generator, index_dir):
    long = view("regular", [generator.index_to_item[i] for i in range(1, 8)])
    client = app_with(generator, index_dir, {"regular": long}, similar_index=str(index_dir),
                      similar_candidates=20, similar_max_events=3)
    seed = generator.index_to_item[5]
    body = client.post("/recommend", json={"user_id": "first-visit", "k": 10, "context": [seed]}).json()
    assert body["fallback"] is False and body["model"].startswith("ugt-") and body["model"].endswith("+similar")
    items = [i["item_id"] for i in body["items"]]
    neighbours = [i for i, _ in SimilarIndex.load(index_dir).neighbours(seed, 10)]
    assert seed not in items and set(items) & set(neighbours[:3])  # the nearest ones rank high in the fusion
    regular = client.post("/recommend", json={"user_id": "regular", "k": 10}).json()
    assert regular["model"].startswith("ugt-") and "+similar" not in regular["model"]  # 7 events: the model alone
    assert 'ugt_serving_similar_answers_total{how="merged"} 1.0' in client.get("/metrics").text


def test_items_only_the_index_knows_are_answered_by_their_neighbours(generator, index_dir):
    similar = SimilarItems.load(index_dir)
    donor = generator.index_to_item[9]
    similar.index.add_vectors(["fresh-item"], similar.index.vectors[similar.index.position[donor]][None])
    client = app_with(generator, index_dir, similar=similar, similar_index=str(index_dir), similar_candidates=10)
    body = client.post("/recommend", json={"user_id": "first-visit", "k": 5, "context": ["fresh-item"]}).json()
    assert body["fallback"] is False and body["model"] == f"similar-{similar.version}", body
    assert body["items"][0]["item_id"] == donor  # the same vector: nearest
    off = app_with(generator, index_dir).post("/recommend", json={"user_id": "x", "k": 5, "context": ["fresh-item"]})
    assert off.json()["fallback_reason"] == "no_known_items"  # without the source: popularity, as before


def test_merge_by_rank_and_candidates():
    a = [ScoredItem("x", 9.0), ScoredItem("y", 8.0), ScoredItem("z", 7.0)]
    b = [ScoredItem("z", 0.9), ScoredItem("w", 0.8)]
    merged = merge_by_rank(a, b, 3)
    assert [m.item_id for m in merged] == ["z", "x", "y"]  # in both lists: first
    assert merged[0].score == pytest.approx(1 / 63 + 1 / 61)


def synthetic_index(folder: Path) -> tuple[ItemTables, int, int]:
    """300 items with two-level codes (second level 0..3 of 8 used) saved as an index at ``folder``."""
    rng = np.random.default_rng(0)
    dim, n = 8, 300
    codes = np.stack([rng.integers(0, 4, n + 1), rng.integers(0, 4, n + 1)], axis=1) + np.array([0, 4]) + 1
    codes[0] = 0
    tables = ItemTables(item_ids=[f"i{i}" for i in range(1, n + 1)], collab=rng.normal(size=(n + 1, dim)),
                        genre_table=rng.normal(size=(4, dim)), genres=rng.integers(0, 4, (n + 1, 1)),
                        year_table=rng.normal(size=(5, dim)), years=rng.integers(1, 5, n + 1),
                        code_table=rng.normal(size=(13, dim)), codes=codes, codebook_sizes=[4, 8],
                        genre_names=["Action", "Comedy", "Drama"], sid_version="v1")
    SimilarIndex.build(tables).save(folder)
    return tables, n, dim


def test_a_forked_engine_does_not_inherit_a_held_lock(tmp_path):
    synthetic_index(tmp_path / "idx")
    similar = SimilarItems.load(tmp_path / "idx", live_items=5, redis_factory=lambda: None)
    with similar._lock:  # a request thread searching while the engine is forked again
        child = os.fork()
        if child == 0:  # the engine: its first query must not wait on the parent's lock (SIGALRM kills it if so)
            signal.alarm(20)
            os._exit(0 if len(similar.neighbours("i1", 3)) == 3 else 1)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_the_index_follows_the_new_item_feed(tmp_path):
    from test_live_items import FakeRedis, announce

    tables, n, dim = synthetic_index(tmp_path / "idx")
    feed = FakeRedis()
    similar = SimilarItems.load(tmp_path / "idx", live_items=5, redis_factory=lambda: feed)
    assert similar.live is not None and similar.live.wanted_version == "v1"
    row = 7
    code = (int(tables.codes[row, 0]) - 1, 6)  # second level 6: no trained item has it (a new cluster)
    announce(feed, "brand-new", code, ["Comedy"], 2001)
    with pytest.raises(UnknownItem):
        similar.neighbours("brand-new", 3)
    assert similar.live.poll(feed, "v1", 0) == 1
    assert similar.refresh() == 1 and similar.size == n + 1
    assert similar.refresh() == 0
    assert len(similar.neighbours("brand-new", 3)) == 3
    vector = similar.index.vectors[similar.index.position["brand-new"]]
    assert not vector[:dim].any() and vector[dim:].any()  # placed by content alone
    assert similar.index.tables.shift_codes(np.array([code])).tolist() == [[code[0] + 1, 0]]  # the unseen part dropped
    assert json.loads((tmp_path / "idx" / "manifest.json").read_text())["items"] == n  # the file is unchanged


def test_the_cli_queries_an_index_and_says_what_is_wrong(generator, index_dir, tmp_path, capsys):
    item = generator.index_to_item[10]
    assert ugt_main(["similar", "query", str(index_dir), item, "--k", "3"]) == 0
    printed = capsys.readouterr().out
    assert [line.split()[0] for line in printed.splitlines()[2:]] == [
        i for i, _ in SimilarIndex.load(index_dir).neighbours(item, 3)]
    assert ugt_main(["similar", "query", str(index_dir), "no-such-movie"]) == 1
    assert "is not in the index" in capsys.readouterr().err
    assert ugt_main(["similar", "query", str(tmp_path), item]) == 1
    assert "has no manifest.json" in capsys.readouterr().err
    assert ugt_main(["similar", "build", "--checkpoint", str(tmp_path / "none.pt"), "--out", str(tmp_path)]) == 1
    with pytest.raises(SystemExit) as done:
        ugt_main(["similar", "build", "--help"])
    assert done.value.code == 0 and "--checkpoint" in capsys.readouterr().out
