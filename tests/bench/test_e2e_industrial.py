"""The e2e bench's industrial size on the CPU, in smoke size (bench/e2e_industrial.py, e2e_users.synthetic_users):
the random-weight checkpoint loads as `ugt serve` loads one, synthetic users are written into a real redis-server in
Feast's layout and read back by serving's reader, and the whole bench runs through `ugt serve` (one group, one
rate). No timing assertions. Redis and HTTP on free ports."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bench.e2e_industrial import item_name, write_industrial_checkpoint
from bench.e2e_users import synthetic_users

SMOKE = {"items": 5000, "layers": 2, "dim": 64, "history": 64}


@pytest.fixture()
def redis_client(tmp_path):
    from bench.serving import start_redis

    redis = pytest.importorskip("redis")
    proc, port = start_redis(tmp_path)
    client = redis.Redis(port=port)
    yield client
    client.close()
    proc.terminate()
    proc.wait()


def names_of(items: int) -> np.ndarray:
    return np.asarray([item_name(i) for i in range(items)], dtype=object)


def test_industrial_checkpoint_loads_and_serves_a_synthetic_user(tmp_path):
    from bench.e2e_generator import state_view
    from models.checkpoint import load_checkpoint
    from serving.ugt_generator import UGTGenerator

    path = write_industrial_checkpoint(tmp_path / "ckpt" / "checkpoint.pt", **SMOKE)
    model, cfg, data, ckpt = load_checkpoint(path)
    assert cfg.model == "ugt" and cfg.max_len == SMOKE["history"] and data.num_items == SMOKE["items"]
    assert model.config.num_layers == SMOKE["layers"] and model.config.d_model == SMOKE["dim"]
    assert ckpt["vocab"][item_name(0)] == 1 and ckpt["vocab"][item_name(SMOKE["items"] - 1)] == SMOKE["items"]
    users = synthetic_users(10, names_of(SMOKE["items"]), SMOKE["history"], 48, 16, seed=0)
    generator = UGTGenerator(path, kv_cache_users=10, live_items=0, device="cpu")
    answer = generator.recommend(state_view(users.row(3)), 10, frozenset(), domain="movie")
    assert len(answer) == 10 and all(a.item_id in ckpt["vocab"] for a in answer)
    assert not {a.item_id for a in answer} & set(users.row(3)["recent_item_ids"])  # the history is masked


def test_synthetic_users_are_stable_zipf_like_and_read_back_from_redis(redis_client):
    from infra.feast_store import FeastRedisLayout
    from serving.user_state_reader import RedisStateReader

    names = names_of(5000)
    users = synthetic_users(60, names, window=64, first_events=48, room=16, seed=0)
    first = users.row(7)
    assert len(first["recent_item_ids"]) == 48 and first["event_count"] == 48
    assert np.all(np.diff(first["recent_event_times"]) > 0) and first["last_event_time"] == first["recent_event_times"][-1]
    assert set(first["recent_rating_tokens"]) <= {2, 4, 6, 8, 10}
    moved = users.append_row(7)
    assert moved["recent_item_ids"][:48] == first["recent_item_ids"] and moved["event_count"] == 49
    for _ in range(20):  # past the window: it slides, the newest events kept
        full = users.append_row(7)
    assert len(full["recent_item_ids"]) == 64 and full["recent_item_ids"][-21:] == [
        *moved["recent_item_ids"][-1:], *full["recent_item_ids"][-20:]]
    drawn = np.concatenate([users.row(u)["recent_item_ids"] for u in range(60)])
    _, counts = np.unique(drawn, return_counts=True)
    assert counts.max() > 20 * np.median(counts)  # a head of popular items, not a uniform draw

    users.write_initial(redis_client, chunk=16, processes=2)
    assert np.array_equal(users.shown, users.first)  # the write starts everyone from their first state
    reader = RedisStateReader(redis_client, FeastRedisLayout("ugt"), "user_recent_events")
    for u in (0, 7, 59):
        view, row = reader.read(users.ids[u]), users.row(u)
        assert view is not None and list(view.item_ids) == row["recent_item_ids"]
        assert list(view.event_times) == row["recent_event_times"] and view.event_count == 48
        assert list(view.rating_tokens) == row["recent_rating_tokens"]
    assert redis_client.zcard("ugt:popularity:movie") == 500


def test_industrial_smoke_run_through_ugt_serve(tmp_path):
    """The bench itself: --size industrial --smoke on the CPU, `ugt serve` (model scope) at the smoke rates (a
    slow shared CPU may saturate at the second and skip the rest), with history_hop 8 after its hop-0 comparison."""
    from bench.serving_gpu_e2e import main

    out = tmp_path / "e2e.json"
    skip = "ugt-serve,single-process,anchor-http,anchor-asgi,generator-alone,generator-engine"
    assert main(["--size", "industrial", "--smoke", "--device", "cpu", "--skip", skip, "--users", "300",
                 "--state-writers", "1", "--history-hop", "8", "--compare-hop", "0", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["complete"] and result["conditions"]["size"] == "industrial"
    assert result["conditions"]["model"]["history"] == SMOKE["history"]
    assert result["users"]["users"] == 300 and result["users"]["synthetic"]
    rows = result["rows"]
    assert rows and {r["config"] for r in rows} == {"ugt-serve-model-hop0", "ugt-serve-model"}
    assert rows[0]["config"] == "ugt-serve-model-hop0" and result["conditions"]["history_hop"] == 8
    assert all(r["size"] == "industrial" and r["errors"] == 0 for r in rows)
    for config in ("ugt-serve-model-hop0", "ugt-serve-model"):
        first = next(r for r in rows if r["config"] == config)  # its lowest rate: the model answers, KV consulted
        assert first["requests"] > first["fallbacks"] and first["cache_hit"] + first["cache_append"] > 0
