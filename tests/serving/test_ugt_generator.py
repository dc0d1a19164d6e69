"""UGTGenerator against a real tiny UGT trained on ML-100K (CPU: one epoch on 400 users, ~20 s, once per module)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from contracts.user_state_rule import STATE_VERSION
from models.checkpoint import load_checkpoint, long_history_len
from models.data import SequenceData, history_row, make_split
from models.eval import batch_to_device, history_mask, last_states
from models.train import fit
from models.train_config import TrainConfig, load_config
from serving.config import ConfigError, build_config
from serving.generator import GenerationRequest, NoModelAnswer
from serving.ugt_generator import NO_KNOWN_ITEMS, CheckpointError, UGTGenerator
from serving.user_state_reader import UserStateView

CONFIG = "models/configs/ugt_ml100k_tiny.yaml"
USERS = (0, 1, 7, 42, 150, 399)  # row indices into the test split (users with >= 3 events, sorted ids)


class Clock:
    """The request time the generator sees (epoch seconds); tests set it to the eval target's time."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def served(trained: Path) -> tuple[UGTGenerator, Clock]:
    clock = Clock()
    return UGTGenerator(trained, clock=clock), clock


@pytest.fixture(scope="module")
def loaded(served) -> tuple[TrainConfig, SequenceData]:
    """The checkpoint's config and data, rebuilt the way `ugt eval` does."""
    _, cfg, data, _ = load_checkpoint(served[0].path)
    return cfg, data


def view_of(data: SequenceData, u: int, end: int, gen: UGTGenerator) -> UserStateView:
    """The user's first ``end`` events as the streaming state would hold them (times in ms)."""
    items = [gen.index_to_item[i] for i in data.items[u][:end]]
    times = [int(t) * 1000 for t in data.times[u][:end]]
    return UserStateView(
        user_id=data.user_ids[u], item_ids=tuple(items), action_tokens=(2,) * end,
        rating_tokens=tuple(int(r) for r in data.ratings[u][:end]), event_times=tuple(times),
        event_count=end, last_event_time=times[-1] if times else 0, state_version=STATE_VERSION,
    )


def test_top10_equals_the_eval_ranking(served, loaded):
    gen, clock = served
    cfg, data = loaded
    model = gen.model
    split = make_split(data, "test", cfg.max_len, long_history_len(cfg))
    for r in USERS:
        u = int(split.users[r])
        end = len(data.items[u]) - 1  # the test history: everything before the last event
        clock.now = float(data.times[u][end])  # eval's query time for the last position is the target's time
        np_row = split.rows(np.asarray([r]))
        # The serving input is the evaluator's input, array for array.
        mine = history_row(data.items[u][:end], data.times[u][:end], data.ratings[u][:end], cfg.max_len,
                           long_history_len(cfg), int(data.times[u][end]))
        for key, value in mine.items():
            # eval pads each batch only to its longest row (models.data); past that, serving's row is padding
            theirs = np_row[key]
            if value.ndim == 2 and theirs.ndim == 2 and value.shape[1] > theirs.shape[1]:
                assert not value[:, theirs.shape[1]:].any(), key
                value = value[:, : theirs.shape[1]]
            np.testing.assert_array_equal(value, theirs, err_msg=key)
        with torch.no_grad():
            batch = batch_to_device(np_row, torch.device("cpu"))
            user, _ = model(batch)
            scores = last_states(user.float(), batch["lengths"]) @ model.item_embeddings().float().T
            invalid = history_mask(batch, data, data.num_items, "all", "test")
            expected = scores.masked_fill(invalid, float("-inf")).topk(10, dim=1)
        got = gen.recommend(view_of(data, u, end, gen), 10, set(), domain="movie")
        assert [g.item_id for g in got] == [gen.index_to_item[i] for i in expected.indices[0].tolist()]
        np.testing.assert_allclose([g.score for g in got], expected.values[0].numpy(), rtol=1e-5, atol=1e-6)


def test_topk_skips_history_and_exclude_sorted_and_deterministic(served, loaded):
    gen, clock = served
    _, data = loaded
    u = 5
    state = view_of(data, u, len(data.items[u]), gen)
    clock.now = state.last_event_time / 1000 + 3600
    first = gen.recommend(state, 50, set(), domain="movie")
    exclude = {first[0].item_id, first[3].item_id, "not-an-item"}
    got = gen.recommend(state, 50, exclude, domain="movie")
    assert len(got) == 50 and len({g.item_id for g in got}) == 50
    assert not {g.item_id for g in got} & (set(state.item_ids) | exclude)
    scores = [g.score for g in got]
    assert scores == sorted(scores, reverse=True)
    assert got == gen.recommend(state, 50, exclude, domain="movie")
    assert [g.item_id for g in got[:5]] == [g.item_id for g in first if g.item_id not in exclude][:5]
    # k beyond what is left: every remaining item once, none seen.
    everything = gen.recommend(state, 100_000, set(), domain="movie")
    assert len(everything) == data.num_items - len(set(state.item_ids))


def test_unknown_items_are_skipped_and_no_known_item_is_a_named_fallback(served, loaded):
    gen, clock = served
    _, data = loaded
    state = view_of(data, 3, 20, gen)
    noisy = UserStateView(
        user_id=state.user_id, item_ids=state.item_ids + ("unknown-item",), action_tokens=state.action_tokens + (2,),
        rating_tokens=state.rating_tokens + (8,), event_times=state.event_times + (state.last_event_time + 1000,),
        event_count=21, last_event_time=state.last_event_time + 1000, state_version=2,
    )
    # The unknown item is dropped from the input, so the query time decides; pin it to the same second.
    clock.now = state.last_event_time / 1000 + 60
    assert gen.recommend(noisy, 10, set(), domain="movie") == gen.recommend(state, 10, set(), domain="movie")
    stranger = UserStateView("u", ("x1", "x2"), (2, 2), (8, 8), (1000, 2000), 2, 2000, STATE_VERSION)
    with pytest.raises(NoModelAnswer) as info:
        gen.recommend(stranger, 10, set(), domain="movie")
    assert info.value.reason == NO_KNOWN_ITEMS


def test_version_and_bad_checkpoints(served, trained, tmp_path):
    gen, _ = served
    assert gen.name == "ugt" and gen.version.startswith("ugt-ml100k-tiny-") and len(gen.version.split("-")[-1]) == 8
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(trained.read_bytes()[: 5000])
    with pytest.raises(CheckpointError, match=r"corrupt\.pt.*cannot be loaded.*retrain or point"):
        UGTGenerator(corrupt)
    with pytest.raises(CheckpointError, match=r"missing\.pt.*does not exist"):
        UGTGenerator(tmp_path / "missing.pt")


def test_config_needs_an_existing_checkpoint(trained, tmp_path):
    with pytest.raises(ConfigError, match="checkpoint: generator ugt needs a checkpoint"):
        build_config({"generator": "ugt"}, env={}, base_dir=tmp_path)
    with pytest.raises(ConfigError, match="checkpoint: no such file"):
        build_config({"generator": "ugt", "checkpoint": "nope.pt"}, env={}, base_dir=tmp_path)
    config = build_config({"generator": "ugt", "checkpoint": str(trained)}, env={}, base_dir=tmp_path)
    assert config.checkpoint == str(trained)


def test_app_serves_ugt_and_falls_back_with_a_reason_for_unknown_items(served, loaded):
    from fastapi.testclient import TestClient
    from serving_fakes import FakeClock, FakeStateReader, FakeZsetRedis

    from serving.app import create_app
    from serving.config import ServingConfig
    from serving.fallback import PopularityFallback
    from serving.reranker import FilterReranker
    from serving.service import Components

    gen, clock = served
    _, data = loaded
    state = view_of(data, 9, 30, gen)
    clock.now = state.last_event_time / 1000 + 60
    stranger = UserStateView("s", ("x1",), (2,), (8,), (1000,), 1, 1000, STATE_VERSION)
    redis = FakeZsetRedis({"ugt:popularity:movie": {"p1": 3.0, "p2": 2.0, "p3": 1.0}})
    fallback = PopularityFallback(redis, clock=FakeClock())
    reader = FakeStateReader({"u": state, "s": stranger})
    parts = Components(state_reader=reader, generator=gen, fallback=fallback, reranker=FilterReranker())
    client = TestClient(create_app(config=ServingConfig(), components=parts, client=redis))

    body = client.post("/recommend", json={"user_id": "u", "k": 10}).json()
    assert body["fallback"] is False and body["model"] == f"ugt-{gen.version}"
    assert [i["item_id"] for i in body["items"]] == [s.item_id for s in gen.recommend(state, 10, set(), domain="movie")]
    body = client.post("/recommend", json={"user_id": "s", "k": 2}).json()
    assert body["fallback"] is True and body["fallback_reason"] == NO_KNOWN_ITEMS
    assert [i["item_id"] for i in body["items"]] == ["p1", "p2"]
    assert 'ugt_serving_fallbacks_total{reason="no_known_items"}' in client.get("/metrics").text


def test_recommend_batch_equals_recommend_per_request(served, loaded):
    from serving.generator import GenerationRequest

    gen, clock = served
    _, data = loaded
    states = [view_of(data, u, end, gen) for u, end in ((2, 30), (11, 5), (40, 60), (2, 30))]
    clock.now = max(s.last_event_time for s in states) / 1000 + 600
    stranger = UserStateView("s", ("x1",), (2,), (8,), (1000,), 1, 1000, STATE_VERSION)
    first = gen.recommend(states[0], 5, set(), domain="movie")
    requests = [
        GenerationRequest(states[0], 10, frozenset({first[0].item_id, "nope"}), "movie"),
        GenerationRequest(stranger, 10, frozenset(), "movie"),
        GenerationRequest(states[1], 3, frozenset(states[1].item_ids), "movie"),
        GenerationRequest(states[2], 25, frozenset(), "movie"),
        GenerationRequest(states[3], 7, frozenset(), "movie"),  # the same user twice in one batch
    ]
    answers = gen.recommend_batch(requests)
    assert len(answers) == len(requests)
    assert isinstance(answers[1], NoModelAnswer) and answers[1].reason == NO_KNOWN_ITEMS
    for req, got in zip(requests, answers, strict=True):
        if req.state is stranger:
            continue
        want = gen.recommend(req.state, req.k, req.exclude, domain="movie")
        assert [g.item_id for g in got] == [w.item_id for w in want]
        np.testing.assert_allclose([g.score for g in got], [w.score for w in want], rtol=1e-5, atol=1e-6)
    assert gen.recommend_batch([]) == []


def test_kv_cache_users_answer_as_without_and_append_new_events(trained, loaded):
    """kv_cache_users > 0 (the serving default): a repeat request decodes from the cached prefix (hit), a user whose
    state gained events within the window runs only those (append), one whose window slid is prefilled again
    (miss); the answers match the uncached generator's every time (CPU fp32: scores within 1e-5, same items)."""
    from serving.generator import GenerationRequest

    clock = Clock()
    cached = UGTGenerator(trained, clock=clock, kv_cache_users=8)
    plain = UGTGenerator(trained, clock=clock)
    _, data = loaded
    full = cached.max_len
    long_user = next(u for u in range(len(data.items)) if len(data.items[u]) >= full + 2)
    # user 3: 20 events, again, one more (append), three more (append); the other: a full window, again, again,
    # then two more events: the window slides and the long-term tokens change (miss)
    for step, (end_a, end_b) in enumerate(((20, full), (20, full), (21, full), (24, full + 2))):
        states = [view_of(data, 3, end_a, cached), view_of(data, long_user, end_b, cached)]
        clock.now = max(s.last_event_time for s in states) / 1000 + 600 + 60 * step
        requests = [GenerationRequest(s, 10, frozenset(), "movie") for s in states]
        got, want = cached.recommend_batch(requests), plain.recommend_batch(requests)
        for g, w in zip(got, want, strict=True):
            assert [x.item_id for x in g] == [x.item_id for x in w]
            assert np.abs(np.array([x.score for x in g]) - [x.score for x in w]).max() < 1e-5
    engine = cached.engine.cache
    assert (engine.misses, engine.appends, engine.hits) == (3, 2, 3)

    from fastapi.testclient import TestClient
    from serving_fakes import FakeClock, FakeStateReader, FakeZsetRedis

    from serving.app import create_app
    from serving.config import ServingConfig
    from serving.fallback import PopularityFallback
    from serving.reranker import FilterReranker
    from serving.service import Components

    redis = FakeZsetRedis({"ugt:popularity:movie": {"p1": 3.0}})
    parts = Components(state_reader=FakeStateReader({"u": states[1]}), generator=cached,
                       fallback=PopularityFallback(redis, clock=FakeClock()), reranker=FilterReranker())
    client = TestClient(create_app(config=ServingConfig(), components=parts, client=redis))
    assert client.post("/recommend", json={"user_id": "u", "k": 5}).json()["fallback"] is False
    text = client.get("/metrics").text  # the request above was one more hit
    assert 'ugt_serving_kv_cache_lookups_total{domain="movie",result="hit"} 4.0' in text
    assert 'ugt_serving_kv_cache_lookups_total{domain="movie",result="append"} 2.0' in text
    assert 'ugt_serving_kv_cache_lookups_total{domain="movie",result="miss"} 3.0' in text
    assert f'ugt_serving_kv_cache_bytes{{domain="movie",state="used"}} {float(engine.bytes_used)}' in text
    assert engine.bytes_used == 2 * cached.engine.slot_bytes


def test_history_hop_keeps_a_full_window_appending_and_answers_as_a_fresh_row(trained, loaded):
    """history_hop 4: a user past a full window keeps their window's start for 3 new events (KV appends, not a
    miss per event) and the row is the one built from scratch over the events from models.data.window_start on;
    the cut events still masked when the request excludes them; a hop of max_len or more stops the start."""
    from models.data import window_start
    from serving.generator import GenerationRequest

    clock = Clock()
    hop = 4
    cached = UGTGenerator(trained, clock=clock, kv_cache_users=8, history_hop=hop)
    plain = UGTGenerator(trained, clock=clock, history_hop=hop)
    _, data = loaded
    full = cached.max_len
    u = next(u for u in range(len(data.items)) if len(data.items[u]) >= full + 12)
    starts = []
    for step, end in enumerate(range(full + 1, full + 10)):
        state = view_of(data, u, end, cached)
        clock.now = state.last_event_time / 1000 + 600 + 60 * step
        request = GenerationRequest(state, 10, frozenset(state.item_ids), "movie")
        got, want = cached.recommend_batch([request])[0], plain.recommend_batch([request])[0]
        assert [x.item_id for x in got] == [x.item_id for x in want]
        assert np.abs(np.array([x.score for x in got]) - [x.score for x in want]).max() < 1e-5
        start = window_start(end, full, hop)
        starts.append(start)
        prepared = cached.prepared[state.user_id]
        assert prepared.item_ids == state.item_ids[start:]
        fresh = history_row(data.items[u][start:end], data.times[u][start:end], data.ratings[u][start:end], full,
                            cached.max_long, int(clock.now))
        for key, value in fresh.items():
            np.testing.assert_array_equal(prepared.row[key], value, err_msg=key)
        cut = {cached.item_to_index[i] for i in state.item_ids[:start]} - set(prepared.seen.tolist())
        assert cut <= set(cached.exclusions(prepared, frozenset(state.item_ids)).tolist())
        assert not {x.item_id for x in got} & set(state.item_ids)
    moves = sum(a != b for a, b in zip(starts, starts[1:], strict=False))
    engine = cached.engine.cache
    assert moves == 2 and engine.misses == 1 + moves and engine.appends == len(starts) - 1 - moves
    with pytest.raises(CheckpointError, match="history_hop"):
        UGTGenerator(trained, history_hop=full)


def test_kv_cache_bytes_caps_the_users_kept_and_a_budget_below_one_user_stops_the_start(trained):
    probe = UGTGenerator(trained, kv_cache_users=1)
    budget = 3 * probe.engine.slot_bytes  # two users and the scratch slot
    gen = UGTGenerator(trained, kv_cache_users=100, kv_cache_bytes=budget)
    assert gen.engine.cache.capacity == 2 and gen.prepared_capacity == 2
    assert gen.engine.cache.bytes_reserved <= budget
    with pytest.raises(CheckpointError, match="kv_cache_bytes"):
        UGTGenerator(trained, kv_cache_users=100, kv_cache_bytes=probe.engine.slot_bytes)


@pytest.mark.parametrize("key,value", [("kv_cache_users", -1), ("kv_cache_bytes", -1), ("torch_threads", -2)])
def test_ugt_serving_settings_are_validated(trained, tmp_path, key, value):
    from serving.config import ConfigError, load_config

    bad = tmp_path / "serving.yaml"
    bad.write_text(f"generator: ugt\ncheckpoint: {trained}\n{key}: {value}\n")
    with pytest.raises(ConfigError, match=key):
        load_config(bad, env={})


def test_prepared_rows_equal_fresh_rows_and_still_mask_new_excludes(trained, loaded):
    """A repeat request reuses the user's row with only the request time patched: it must equal the row
    built from scratch, and an `exclude` item outside the history must still be masked."""
    gen = UGTGenerator(trained, clock=Clock(), kv_cache_users=4)
    _, data = loaded
    state = view_of(data, 3, 20, gen)
    first = gen.prepare(state, state.last_event_time // 1000 + 60)
    query_time = state.last_event_time // 1000 + 86_400 * 3  # a much later request: another gap bucket
    again = gen.prepare(state, query_time)
    assert again is first
    fresh = gen.model_input(state, query_time)
    assert fresh is not None and set(fresh) == set(again.row)
    for key, value in fresh.items():
        np.testing.assert_array_equal(again.row[key], value, err_msg=key)

    outside = next(item for item in gen.item_to_index if item not in state.item_ids)
    masked = gen.exclusions(again, frozenset(state.item_ids) | {outside})
    assert gen.item_to_index[outside] in masked
    assert set(again.seen.tolist()) <= set(masked.tolist())
    assert gen.exclusions(again, frozenset(state.item_ids)) is again.seen  # nothing new: no copy

    longer = view_of(data, 3, 21, gen)  # one more event: rebuilt, not reused
    assert gen.prepare(longer, query_time) is not again


def test_prepared_fingerprint_is_the_engine_cache_key(trained, loaded):
    """The generator hands the engine the fingerprint it computed once per prefix: it must be the one the
    engine would compute from the patched row (else a repeat request would miss, or worse, hit another prefix)."""
    from models.ugt.inference import prefix_fingerprint

    gen = UGTGenerator(trained, clock=Clock(), kv_cache_users=4)
    _, data = loaded
    state = view_of(data, 9, 30, gen)
    for query_time in (state.last_event_time // 1000 + 5, state.last_event_time // 1000 + 10**6):
        prepared = gen.prepare(state, query_time)
        assert prepared.fingerprint == prefix_fingerprint(prepared.row)


@pytest.fixture(scope="module")
def trained_with_ranking(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ugt-rank")
    cfg = load_config(CONFIG, {"out_dir": str(out), "progress": False, "device": "cpu", "max_epochs": 1,
                                  "max_users": 400, "model_config.heads.ranking": True,
                                  "model_config.heads.rank_top": 30})
    fit(cfg)
    return out / "checkpoint.pt"


def test_a_checkpoint_with_a_ranking_head_is_served_ranked_as_the_eval_cascade(trained_with_ranking, trained):
    from models.ugt.ranking import candidate_logits, prefix_from_layers

    clock = Clock()
    gen = UGTGenerator(trained_with_ranking, clock=clock, kv_cache_users=16)  # rank_top -1: the checkpoint's 30
    assert gen.engine.config.rank_top == 30
    plain = UGTGenerator(trained_with_ranking, clock=clock, kv_cache_users=16, rank_top=0)
    _, cfg, data, _ = load_checkpoint(trained_with_ranking)
    model = gen.model
    split = make_split(data, "test", cfg.max_len, long_history_len(cfg))
    changed = 0
    for r in USERS:
        u = int(split.users[r])
        end = len(data.items[u]) - 1
        clock.now = float(data.times[u][end])
        with torch.no_grad():
            batch = batch_to_device(split.rows(np.asarray([r])), torch.device("cpu"))
            user, _, (inputs, times, valid) = model(batch, keep=True)
            state = last_states(user.float(), batch["lengths"])
            table = model.item_embeddings().float()
            invalid = history_mask(batch, data, data.num_items, "all", "test")
            cands = (state @ table.T).masked_fill(invalid, float("-inf")).topk(30, dim=1).indices
            G = valid.shape[1] - batch["ids"].shape[1]
            request = batch["query_times"].gather(1, (batch["lengths"] - 1).view(1, 1)).view(1)
            prefix = prefix_from_layers(model, inputs, times, valid, G + batch["lengths"], request)
            logits = candidate_logits(model, prefix, cands, state, table)
            want = logits.topk(10, dim=1)
        for _ in range(2):  # a KV-cache miss (prefill), then a hit (decode): the same ranked answer
            got = gen.recommend_batch([GenerationRequest(view_of(data, u, end, gen), 10, frozenset(), "movie")])[0]
            assert [g.item_id for g in got] == [gen.index_to_item[int(cands[0, i])] for i in want.indices[0]]
            np.testing.assert_allclose([g.score for g in got], want.values[0].numpy(), rtol=1e-4, atol=1e-4)
        assert gen.recommend(view_of(data, u, end, gen), 10, set(), domain="movie") == got  # the unbatched call
        retrieval = plain.recommend(view_of(data, u, end, gen), 10, set(), domain="movie")
        changed += [g.item_id for g in retrieval] != [g.item_id for g in got]
    assert gen.engine.cache.hits >= len(USERS)
    assert changed > 0  # the head reorders, it is not a pass-through of retrieval
    with pytest.raises(CheckpointError, match="rank_top"):
        UGTGenerator(trained, kv_cache_users=16, rank_top=50)  # no ranking head in that checkpoint
    assert UGTGenerator(trained, kv_cache_users=16).engine.config.rank_top == 0  # -1 follows the checkpoint
    with pytest.raises(CheckpointError, match="beam_size: 0"):  # this checkpoint has no semantic-ID head
        UGTGenerator(trained_with_ranking, kv_cache_users=16, beam_size=20)


def test_quantize_int8_serves_the_checkpoint_with_int8_layers(trained, loaded, served):
    """The serving key quantize: int8 reaches the engine; its answers are the fp32 generator's, near-ties aside."""
    cfg, data = loaded
    gen, clock = served
    int8 = UGTGenerator(trained, clock=clock, quantize="int8")
    assert isinstance(int8.engine.model.layers[0].attn.o, torch.ao.nn.quantized.dynamic.Linear)
    overlap = []
    for u in range(20):
        end = len(data.items[u]) - 1
        clock.now = float(data.times[u][end])
        got = [{g.item_id for g in x.recommend(view_of(data, u, end, x), 10, set(), domain="movie")}
               for x in (gen, int8)]
        overlap.append(len(got[0] & got[1]) / 10)
    assert np.mean(overlap) >= 0.8, overlap


def test_quantize_int8_weight_reaches_the_engine_and_fp8_on_cpu_stops_the_start(trained):
    """The GPU variants through the serving key: int8_weight serves anywhere (its layers in the engine); fp8 on the
    CPU fp32 engine is refused at start with the reason and the serving keys to change."""
    from models.ugt.weight_quant import Int8WeightLinear

    gen = UGTGenerator(trained, clock=Clock(), quantize="int8_weight", device="cpu")
    assert isinstance(gen.engine.model.layers[0].attn.o, Int8WeightLinear)
    with pytest.raises(CheckpointError, match="fp8 runs on the bf16 engine.*quantize: none"):
        UGTGenerator(trained, clock=Clock(), quantize="fp8", device="cpu")


def test_paged_attention_reaches_the_engine_and_stops_a_start_that_cannot_run_it(trained, monkeypatch):
    """The serving key paged_attention: refused at start where it cannot run (no KV cache; no Triton on a plain
    CPU engine) with the keys to change; under Triton's CPU interpreter the engine reads the pool in place."""
    with pytest.raises(CheckpointError, match="paged_attention.*set the serving key paged_attention: false"):
        UGTGenerator(trained, clock=Clock(), kv_cache_users=0, paged_attention=True, device="cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    gen = UGTGenerator(trained, clock=Clock(), kv_cache_users=4, paged_attention=True, device="cpu")
    assert gen.engine.config.paged_attention and gen.engine.stack.paged


def test_a_state_with_new_events_extends_the_cached_row_as_a_rebuild_would(trained, loaded):
    """New events appended to a cached user's state patch the cached row (no rebuild): it must equal
    model_input of the whole state, for 1 and 3 new events, and a sliding window is rebuilt instead."""
    gen = UGTGenerator(trained, clock=Clock(), kv_cache_users=4)
    _, data = loaded
    u = next(i for i in range(len(data.items)) if len(data.items[i]) >= 30)
    first = view_of(data, u, 20, gen)
    gen.prepare(first, first.last_event_time // 1000 + 60)
    for end in (21, 24):
        longer = view_of(data, u, end, gen)
        query_time = longer.last_event_time // 1000 + 3_600
        cached = gen.prepared[longer.user_id]
        extended = gen.extended_row(cached, longer, query_time)
        assert extended is not None
        fresh = gen.model_input(longer, query_time)
        assert set(fresh) == set(extended)
        for key, value in fresh.items():
            np.testing.assert_array_equal(extended[key], value, err_msg=f"{end}: {key}")
        prepared = gen.prepare(longer, query_time)
        assert prepared.fingerprint == prefix_fingerprint_of(prepared.row)
        rebuilt = UGTGenerator(trained, clock=Clock(), kv_cache_users=4).prepare(longer, query_time)
        np.testing.assert_array_equal(prepared.seen, rebuilt.seen)  # the extended exclusions as a rebuild's
        assert prepared.history == rebuilt.history
    full = view_of(data, u, gen.max_len + 1, gen) if len(data.items[u]) > gen.max_len else None
    if full is not None:  # past the window: the cached row cannot be extended
        assert gen.extended_row(gen.prepared[full.user_id], full, full.last_event_time // 1000) is None


def prefix_fingerprint_of(row):
    from models.ugt.inference import prefix_fingerprint

    return prefix_fingerprint(row)


def test_batch_buckets_reach_the_largest_model_step():
    """Batches past 128 rows (engine_max_rows 256/512) get a bucket, so CUDA replays a graph instead of running eager."""
    from serving.ugt_generator import batch_buckets_up_to

    assert batch_buckets_up_to(64) == (1, 8, 32, 128)
    assert batch_buckets_up_to(128) == (1, 8, 32, 128)
    assert batch_buckets_up_to(256) == (1, 8, 32, 128, 256)
    assert batch_buckets_up_to(300) == (1, 8, 32, 128, 256, 512)


def test_sorted_union_is_union1d():
    """An append's exclusions grow by insertion into the sorted history indices: the same array np.union1d gives."""
    from serving.ugt_generator import sorted_union

    rng = np.random.default_rng(3)
    for _ in range(500):
        seen = np.unique(rng.integers(1, 60, rng.integers(1, 40)))
        new = rng.integers(1, 80, rng.integers(1, 6))
        got = sorted_union(seen, new)
        assert got.dtype == np.int64 and got.tolist() == np.union1d(seen, new).tolist()
    assert sorted_union(np.zeros(0, np.int64), np.asarray([5, 2, 5])).tolist() == [2, 5]


def test_item_indices_mark_unknown_items_zero(trained):
    gen = UGTGenerator(trained, clock=Clock())
    known = list(gen.item_to_index)[:3]
    got = gen.item_indices((known[0], "not-an-item", known[2], known[0]))
    assert got.dtype == np.int64
    assert got.tolist() == [gen.item_to_index[known[0]], 0, gen.item_to_index[known[2]], gen.item_to_index[known[0]]]
