"""Target-aware ranking head (models.ugt.ranking): the math, the KV-cache serving path, training and the cascade eval.

CPU fp32, tiny models. The parity tests pin the candidate path to the model's own forward: a candidate scored
after a history is exactly that candidate appended as one more event token (no rating, at the request time).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models.data import build_sequences, history_row, time_gap_bucket_array
from models.eval import batch_to_device, last_states
from models.train import fit
from models.train_config import TrainConfig
from models.ugt.inference import InferenceConfig, UGTInference, prefix_fingerprint
from models.ugt.model import UGT, UGTConfig
from models.ugt.ranking import candidate_logits, prefix_from_layers, ranking_loss
from tests.models.conftest import random_dataset

NUM_ITEMS = 40
N, G, E = 12, 3, 10


def make_model(seed: int = 0, long_groups: int = G, semantic_ids: bool = False) -> UGT:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    cfg = UGTConfig.from_dict({
        "num_items": NUM_ITEMS, "d_model": 32, "num_layers": 2, "num_heads": 2, "dqk": 16, "dv": 16,
        "multiscale": {"recent_len": N, "long_groups": long_groups, "max_long": E},
        "moe": {"d_ff": 32, "num_experts": 2, "top_k": 1}, "heads": {"semantic_id": semantic_ids, "ranking": True},
    })
    genres = rng.integers(0, 5, size=(NUM_ITEMS + 1, 2))
    genres[0] = 0
    codes = None
    if semantic_ids:  # 40 distinct 3-level IDs out of 4 x 4 x 3
        flat = rng.choice(48, size=NUM_ITEMS, replace=False)
        codes = np.zeros((NUM_ITEMS + 1, 3), np.int64)
        codes[1:] = np.stack([flat // 12, (flat // 3) % 4, flat % 3], 1)
    model = UGT(cfg, genres, rng.integers(0, 6, size=NUM_ITEMS + 1), codes, [4, 4, 3] if semantic_ids else None).eval()
    with torch.no_grad():  # a trained-looking head, so logits differ between candidates
        for p in model.ranker.parameters():
            p.normal_(0, 0.3)
    return model


def history(n: int, seed: int, request_gap: int = 3600):
    rng = np.random.default_rng(seed)
    items = rng.integers(1, NUM_ITEMS + 1, size=n)
    times = 1_600_000_000 + np.cumsum(rng.integers(1, 90_000, size=n))
    ratings = rng.integers(1, 10, size=n)
    return items, times, ratings, int(times[-1]) + request_gap


def stack(rows):
    return batch_to_device({k: np.concatenate([r[k] for r in rows]) for k in rows[0]}, torch.device("cpu"))


def reference_logits(model: UGT, rows, cands: torch.Tensor) -> torch.Tensor:
    """Candidate logits through the training / evaluation path (a full forward of each history)."""
    batch = stack(rows)
    with torch.no_grad():
        hidden, _, (inputs, times, valid) = model.encode_layers(batch, keep=True)
        lengths = batch["lengths"]
        request = batch["query_times"].gather(1, (lengths - 1).view(-1, 1)).view(-1)
        prefix = prefix_from_layers(model, inputs, times, valid, valid.shape[1] - N + lengths, request)
        user = F.normalize(last_states(hidden, lengths), dim=-1, eps=1e-6)
        return candidate_logits(model, prefix, cands, user, model.item_embeddings())


def test_a_candidate_scores_exactly_as_one_more_event_token_in_the_forward():
    model = make_model(long_groups=0)
    n, cand = 5, 7
    items, times, ratings, request = history(n, seed=3)
    row = history_row(items, times, ratings, N, 0, request)
    # The same history with the candidate appended as a real event: no rating, at the request time.
    ext = {k: v.copy() for k, v in row.items()}
    ext["ids"][0, n], ext["times"][0, n], ext["query_times"][0, n] = cand, request, request
    ext["ratings"][0, n], ext["query_gaps"][0, n] = 0, 0
    ext["gaps"][0, n] = time_gap_bucket_array(np.asarray([request - times[-1]]))[0]
    ext["lengths"][0] = n + 1
    with torch.no_grad():
        model.ranker.position.copy_(model.embed.pos_emb.weight[n])  # the absolute position the appended token has
        hidden, _ = model.encode(stack([ext]))
        user = F.normalize(hidden[:, n - 1], dim=-1, eps=1e-6)
        want = model.ranker(hidden[:, n : n + 1], (model.item_embeddings()[cand] * user).sum(-1, keepdim=True))
    got = reference_logits(model, [row], torch.tensor([[cand]]))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_candidates_never_see_each_other_so_micro_batches_change_nothing():
    model = make_model()
    rows = [history_row(*history(n, seed=n)[:3], N, E, history(n, seed=n)[3]) for n in (4, 15)]
    cands = torch.tensor([[3, 9, 27, 1, 40, 11], [5, 5, 8, 2, 19, 33]])
    whole = reference_logits(model, rows, cands)
    single = torch.cat([reference_logits(model, rows, cands[:, i : i + 1]) for i in range(cands.shape[1])], dim=1)
    torch.testing.assert_close(whole, single, rtol=1e-5, atol=1e-5)
    assert whole[1, 0] == pytest.approx(float(whole[1, 1]), abs=1e-6)  # the same item twice: the same logit
    assert float(whole.std()) > 1e-3  # and the logits do depend on the candidate


def test_served_ranking_reads_the_kv_cache_and_matches_the_full_forward():
    model = make_model()
    rows = [history_row(*history(n, seed=10 + n)[:3], N, E, history(n, seed=10 + n)[3]) for n in (2, 7, 12, 19)]
    keys = [f"u{i}" for i in range(len(rows))]
    eng = UGTInference(model, InferenceConfig(device="cpu", dtype="fp32", cache_slots=8, rank_top=10))
    excludes = [np.unique(r["ids"][0][r["ids"][0] > 0]) for r in rows]

    def check(tops, rows_now):
        items = torch.tensor(np.stack([t.indices for t in tops]))
        want = reference_logits(model, rows_now, items)
        np.testing.assert_allclose(np.stack([t.scores for t in tops]), want.numpy(), rtol=1e-4, atol=1e-5)
        for t, ex in zip(tops, excludes, strict=True):
            assert not set(t.indices.tolist()) & set(ex.tolist())
            assert list(t.scores) == sorted(t.scores, reverse=True)
        return items

    first = check(eng.recommend(rows, excludes, 5, keys), rows)  # misses: prefilled, then ranked
    assert eng.cache.misses == 4
    # the same histories at a later request time: every row a cache hit (the compact decode path)
    later = [{**r, "query_times": r["query_times"].copy()} for r in rows]
    for r in later:
        r["query_times"][0, int(r["lengths"][0]) - 1] += 7200
    prints = [prefix_fingerprint(r) for r in later]
    check(eng.recommend(later, excludes, 5, keys, prints), later)
    assert eng.cache.hits == 4
    # the top 5 come from retrieval's top 10, reordered: ranking changed at least one list
    retrieval = UGTInference(model, InferenceConfig(device="cpu", dtype="fp32"))
    plain = torch.tensor(np.stack([t.indices for t in retrieval.recommend(rows, excludes, 10)]))
    for b in range(len(rows)):
        assert set(first[b].tolist()) <= set(plain[b].tolist())
    assert not torch.equal(first, plain[:, :5])


def test_ranking_needs_a_ranking_head_and_the_kv_cache():
    model = make_model()
    with pytest.raises(ValueError, match="cache_slots"):
        UGTInference(model, InferenceConfig(device="cpu", rank_top=10))
    model.ranker = None
    with pytest.raises(ValueError, match="heads.ranking"):
        UGTInference(model, InferenceConfig(device="cpu", cache_slots=4, rank_top=10))


@pytest.mark.parametrize("backbone_grad", [False, True])
def test_ranking_loss_trains_the_head_and_reaches_the_backbone_only_when_asked(backbone_grad):
    model = make_model().train()
    model.config.heads.ranking_backbone_grad = backbone_grad
    rng = np.random.default_rng(0)
    rows = [history_row(*history(n, seed=n)[:3], N, E, history(n, seed=n)[3]) for n in rng.integers(3, 20, 16)]
    batch = stack(rows)
    batch["targets"] = torch.roll(batch["ids"], -1, dims=1)  # next event as the target of each position
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for step in range(60):
        torch.manual_seed(step % 3)  # a few fixed cuts, so the loss can fall
        user, _, (inputs, times, valid) = model(batch, keep=True)
        loss = ranking_loss(model, user, inputs, times, valid, batch, model.item_embeddings())
        opt.zero_grad()
        loss.backward()
        if step == 0:
            assert model.ranker.out.weight.grad.abs().sum() > 0
            backbone = model.layers[0].attn.uvqk.grad
            assert (backbone is not None and backbone.abs().sum() > 0) == backbone_grad
        opt.step()
        losses.append(float(loss.detach()))
    assert np.isfinite(losses).all()
    assert np.mean(losses[-3:]) < 0.75 * np.mean(losses[:3])


def test_fit_reports_the_cascade_and_reordering_the_top_10_keeps_hr_at_10(tmp_path):
    data = build_sequences(random_dataset(users=16, events=20), "stable")
    cfg = TrainConfig(name="rank", model="ugt", max_len=10, batch_size=8, max_epochs=2, patience=5, progress=False,
                      device="cpu", out_dir=str(tmp_path), eval_batch_size=8,
                      model_config={"d_model": 16, "num_layers": 1, "num_heads": 1, "dqk": 8, "dv": 8,
                                    "multiscale": {"long_groups": 2, "max_long": 8},
                                    "heads": {"semantic_id": False, "ranking": True, "rank_top": 10,
                                              "ranking_candidates": 10}})
    summary = fit(cfg, data=data)
    test, ranked = summary["test"], summary["test"]["target_aware"]
    assert ranked["rerank_top"] == 10
    # only the order inside retrieval's top 10 changes: who is in the top 10 (and the top 50) does not
    assert ranked["hr@10"] == pytest.approx(test["hr@10"]) and ranked["hr@50"] == pytest.approx(test["hr@50"])
    assert 0 <= ranked["ndcg@10"] <= ranked["hr@10"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (runs on the GPU machine)")
def test_cuda_graph_ranking_matches_the_eager_step():
    model = make_model()
    rows = [history_row(*history(n, seed=30 + n)[:3], N, E, history(n, seed=30 + n)[3]) for n in (3, 9, 16)]
    keys = [f"u{i}" for i in range(len(rows))]
    excludes = [np.unique(r["ids"][0][r["ids"][0] > 0]) for r in rows]
    answers = []
    for graphs in (False, True):
        eng = UGTInference(model, InferenceConfig(device="cuda", dtype="fp32", cache_slots=8, rank_top=10,
                                                  cuda_graphs=graphs, batch_buckets=(1, 4)))
        first = eng.recommend(rows, excludes, 5, keys)  # misses
        again = eng.recommend(rows, excludes, 5, keys)  # hits: the compact layout
        answers.append((first, again))
        if graphs:
            assert {key.kind for key in eng.graphs} >= {"rank", "rank_compact"}
    for eager, graphed in zip(answers[0], answers[1], strict=True):
        for a, b in zip(eager, graphed, strict=True):
            assert a.indices.tolist() == b.indices.tolist()
            np.testing.assert_allclose(a.scores, b.scores, rtol=1e-4, atol=1e-4)


def test_ranking_on_the_compiled_cpu_engine_gives_the_eager_answers():
    """torch_compile serving: prefill/decode compiled, the ranking step eager on their KV cache; same answers."""
    model = make_model(seed=4)
    rows = [history_row(*history(n, seed=50 + n)[:3], N, E, history(n, seed=50 + n)[3]) for n in (2, 6, 13, 18)]
    later = [{**r, "query_times": r["query_times"].copy()} for r in rows]
    for r in later:
        r["query_times"][0, int(r["lengths"][0]) - 1] += 900
    keys = [f"u{i}" for i in range(len(rows))]
    excludes = [np.unique(r["ids"][0][r["ids"][0] > 0]) for r in rows]
    eager = UGTInference(model, InferenceConfig(device="cpu", dtype="fp32", cache_slots=8, rank_top=8))
    compiled = UGTInference(model, InferenceConfig(device="cpu", dtype="fp32", cache_slots=8, rank_top=8, compile=True))
    with torch._dynamo.config.patch(error_on_recompile=True):
        for users, source in (([0], rows), ([1, 2], rows), ([0, 1, 2], later), ([3, 0], later)):  # miss, hits, mixed
            batch = [source[u] for u in users]
            ex = [excludes[u] for u in users]
            got = compiled.recommend(batch, ex, 4, [keys[u] for u in users])
            want = eager.recommend(batch, ex, 4, [keys[u] for u in users])
            for g, w in zip(got, want, strict=True):
                assert g.indices.tolist() == w.indices.tolist()
                np.testing.assert_allclose(g.scores, w.scores, rtol=1e-4, atol=1e-4)


def test_with_beam_search_the_ranking_head_orders_the_union_of_both_lists():
    model = make_model(seed=6, semantic_ids=True)
    rows = [history_row(*history(n, seed=70 + n)[:3], N, E, history(n, seed=70 + n)[3]) for n in (3, 8, 17)]
    keys = [f"u{i}" for i in range(len(rows))]
    excludes = [np.unique(r["ids"][0][r["ids"][0] > 0]) for r in rows]
    eng = UGTInference(model, InferenceConfig(device="cpu", dtype="fp32", cache_slots=8, rank_top=5, beam_size=8,
                                              merge="rrf"))
    retrieval = UGTInference(model, InferenceConfig(device="cpu", dtype="fp32"))
    tops = eng.recommend(rows, excludes, 6, keys)
    ret = retrieval.recommend(rows, excludes, 6)  # max(k, rank_top) retrieval candidates
    batch = stack(rows)
    with torch.no_grad():
        user = F.normalize(last_states(model(batch)[0], batch["lengths"]), dim=-1)
        beam_items, _ = model.generate(user, 8)
    from_beam = 0
    for b, top in enumerate(tops):
        union = set(ret[b].indices.tolist()) | set(beam_items[b].tolist())
        got = top.indices.tolist()
        assert len(got) == len(set(got)) == 6 and set(got) <= union - set(excludes[b].tolist()) - {0}
        want = reference_logits(model, [rows[b]], torch.tensor([got]))[0]
        np.testing.assert_allclose(top.scores, want.numpy(), rtol=1e-4, atol=1e-5)
        assert list(top.scores) == sorted(top.scores, reverse=True)
        from_beam += len(set(got) - set(ret[b].indices.tolist()))
    assert from_beam > 0  # beam search brought in items retrieval's own list lacked
