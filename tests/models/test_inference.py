"""Batched UGT inference (models.ugt.inference) against the model's own forward: prefill, KV-cache decode, top-k.

CPU fp32 here (the CUDA path, bf16 + graphs + the Triton kernel, runs the same tests on the GPU machine).
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from models.data import history_row
from models.eval import batch_to_device, last_states
from models.ugt.inference import (
    COMPACT_WIDTH,
    MISS,
    BatchDescriptor,
    InferenceConfig,
    PrefixCache,
    UGTInference,
    prefix_fingerprint,
)
from models.ugt.model import UGT, UGTConfig

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SIZES = [4, 4, 3]
NUM_ITEMS = 40


def make_model(seed: int = 0, top_k: int = 1) -> UGT:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    codes = np.zeros((NUM_ITEMS + 1, 3), np.int64)
    flat = rng.choice(4 * 4 * 3, size=NUM_ITEMS, replace=False)
    codes[1:] = np.stack([flat // 12, (flat // 3) % 4, flat % 3], 1)
    cfg = UGTConfig.from_dict({
        "num_items": NUM_ITEMS, "d_model": 32, "num_layers": 2, "num_heads": 2, "dqk": 16, "dv": 16,
        "embedding": {"item_repr": "id+sid"}, "multiscale": {"recent_len": 12, "long_groups": 3, "max_long": 10},
        "moe": {"d_ff": 32, "num_experts": 2, "top_k": top_k},
    })
    genres = rng.integers(0, 5, size=(NUM_ITEMS + 1, 2))
    genres[0] = 0
    years = rng.integers(0, 6, size=NUM_ITEMS + 1)
    return UGT(cfg, genres, years, codes, SIZES).eval()


def user_rows(n_users: int, seed: int = 1) -> list[dict[str, np.ndarray]]:
    """Histories of varied length (some longer than the window, so long-term tokens are in play)."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n_users):
        n = int(rng.integers(1, 20))
        items = rng.integers(1, NUM_ITEMS + 1, size=n)
        times = 1_600_000_000 + np.cumsum(rng.integers(1, 90_000, size=n))
        ratings = rng.integers(0, 10, size=n)
        rows.append(history_row(items, times, ratings, 12, 10, int(times[-1]) + 3600 + u))
    return rows


def reference_users(model: UGT, rows) -> torch.Tensor:
    batch = batch_to_device({k: np.concatenate([r[k] for r in rows]) for k in rows[0]}, torch.device("cpu"))
    with torch.no_grad():
        user, _ = model(batch)
        return last_states(user.float(), batch["lengths"])


def excludes_of(rows) -> list[np.ndarray]:
    return [np.unique(np.concatenate([r["ids"][0], r["long_ids"][0]])) for r in rows]


def test_prefill_matches_the_model_forward_and_topk_masks_history():
    model = make_model()
    rows = user_rows(6)
    eng = UGTInference(model, InferenceConfig(device="cpu", dtype="fp32"))
    host = eng.pack(eng.row_vectors(rows), eng.exclusion_matrix(excludes_of(rows)), [0] * 6, 6)
    user, dev = eng.users(host, [MISS] * 6)
    torch.testing.assert_close(user, reference_users(model, rows), rtol=1e-5, atol=1e-6)
    table = model.item_embeddings().float().detach()
    got = eng.recommend(rows, excludes_of(rows), 5)
    for b, row in enumerate(rows):
        scores = reference_users(model, [row]) @ table.T
        scores[0, excludes_of([row])[0]] = float("-inf")
        scores[0, 0] = float("-inf")
        want = scores.topk(5, dim=1)
        assert got[b].indices.tolist() == want.indices[0].tolist()
        np.testing.assert_allclose(got[b].scores, want.values[0].numpy(), rtol=1e-5, atol=1e-6)


def test_kv_cache_decode_equals_a_fresh_prefill_at_a_new_request_time():
    model = make_model(1)
    rows = user_rows(5, seed=2)
    keys = [f"u{i}" for i in range(5)]
    cached = UGTInference(model, InferenceConfig(device="cpu", dtype="fp32", cache_slots=3))
    plain = UGTInference(model, InferenceConfig(device="cpu", dtype="fp32"))
    cached.recommend(rows[:3], excludes_of(rows[:3]), 8, keys[:3])
    assert cached.cache.misses == 3 and cached.cache.hits == 0
    later = []
    for r in rows[:3]:  # same events, a later request: only the last position's query time moves
        r2 = {k: v.copy() for k, v in r.items()}
        n = int(r2["lengths"][0])
        r2["query_times"][0, n - 1] += 7200
        later.append(r2)
    assert [prefix_fingerprint(r) for r in later] == [prefix_fingerprint(r) for r in rows[:3]]
    got = cached.recommend(later, excludes_of(later), 8, keys[:3])
    assert cached.cache.hits == 3
    want = plain.recommend(later, excludes_of(later), 8)
    for g, w in zip(got, want, strict=True):
        assert g.indices.tolist() == w.indices.tolist()
        np.testing.assert_allclose(g.scores, w.scores, rtol=1e-4, atol=1e-5)
    # A mixed batch: two hits, one new user (miss) evicting the least recent, one repeated key (uncached).
    mixed = [later[1], later[2], rows[3], rows[3]]
    got = cached.recommend(mixed, excludes_of(mixed), 8, [keys[1], keys[2], keys[3], keys[3]])
    want = plain.recommend(mixed, excludes_of(mixed), 8)
    assert [g.indices.tolist() for g in got] == [w.indices.tolist() for w in want]
    assert keys[0] not in cached.cache.entries and cached.cache.hits == 5


def test_prefix_fingerprint_is_the_position_digest_and_ignores_the_request_time():
    """The cache key is SHA-256 (16 bytes) of the long-term input, the positions before the last one (every
    ROW_FIELD, position by position), the last one's fields but its query time and gap, and the length; for
    contiguous and strided arrays alike; a hash of the positions before the last, extended by new positions, gives
    what a whole hash gives; rows that differ in one event, or only in their length, differ."""
    import hashlib

    from models.ugt.runner.batch import ROW_FIELDS, extend_hash, fingerprint_from, prefix_hash

    rng = np.random.default_rng(5)
    for n in (1, 7, 40):
        row = history_row(rng.integers(1, 50, n), np.sort(rng.integers(10**9, 2 * 10**9, n)), rng.integers(1, 9, n),
                          16, 8, 3 * 10**9)
        m = int(row["lengths"][0])
        reference = hashlib.sha256(row["long_ids"].tobytes() + row["long_times"].tobytes())
        for i in range(m - 1):
            reference.update(np.asarray([row[key][0, i] for key in ROW_FIELDS], dtype=np.int64).tobytes())
        reference.update(np.asarray([row[key][0, m - 1] for key in ("ids", "times", "ratings", "gaps")]).tobytes())
        reference.update(m.to_bytes(8, "little"))
        assert prefix_fingerprint(row) == reference.digest()[:16]
        split = max(m - 3, 0)  # a hash of the first positions, extended by the rest
        assert fingerprint_from(extend_hash(prefix_hash(row, split), row, split, max(m - 1, 0)), row) \
            == reference.digest()[:16]
        other = {key: value.copy() for key, value in row.items()}
        other["ratings"][0, 0] += 1
        assert prefix_fingerprint(other) != prefix_fingerprint(row)
        if m > 1:
            shorter = {key: value.copy() for key, value in row.items()}
            shorter["lengths"][0] = m - 1
            assert prefix_fingerprint(shorter) != prefix_fingerprint(row)
        strided = {key: np.repeat(value, 2, axis=-1)[..., ::2] for key, value in row.items()}  # same values, strided
        assert not strided["ids"].flags.c_contiguous
        assert prefix_fingerprint(strided) == reference.digest()[:16]
        later = {key: value.copy() for key, value in row.items()}
        later["query_times"][0, int(row["lengths"][0]) - 1] += 3600
        later["query_gaps"][0, int(row["lengths"][0]) - 1] += 1
        assert prefix_fingerprint(later) == reference.digest()[:16]


def test_prefix_cache_lru_and_scratch():
    cache = PrefixCache(2)
    slots, hits = cache.assign(["a", "b", "a", None], [b"1", b"2", b"1", b"x"])
    assert hits == [False, False, False, False] and slots[2] == slots[3] == cache.scratch
    slots2, hits2 = cache.assign(["a", "c", "b"], [b"1", b"3", b"9"])
    assert hits2 == [True, False, False] and slots2[0] == slots[0]
    assert "b" in cache.entries and len(cache.entries) == 2  # c evicted b, then b came back evicting a
    assert len(set(slots2)) == 3 or slots2[1] != slots2[2]


def test_score_candidates_and_rrf_merge_return_valid_unseen_items():
    model = make_model(2)
    rows = user_rows(4, seed=3)
    eng = UGTInference(model, InferenceConfig(device="cpu", dtype="fp32", beam_size=20, merge="rrf",
                                              candidate_micro_batch=7))
    excl = excludes_of(rows)
    got = eng.recommend(rows, excl, 10)
    for g, e in zip(got, excl, strict=True):
        assert len(g.indices) == 10 and len(set(g.indices.tolist())) == 10
        assert not set(g.indices.tolist()) & set(e.tolist()) and 0 not in g.indices
        assert list(g.scores) == sorted(g.scores, reverse=True)
    host = eng.pack(eng.row_vectors(rows), eng.exclusion_matrix(excl), [0] * 4, 4)
    user, _ = eng.users(host, [MISS] * 4)
    cands = torch.randint(1, NUM_ITEMS + 1, (4, 23))
    want = (user @ eng.table.T).gather(1, cands)
    torch.testing.assert_close(eng.score_candidates(user, cands), want)


@pytest.mark.skipif(DEVICE != "cuda", reason="the heads graph is a CUDA graph")
def test_heads_graph_gives_the_eager_answers_and_follows_a_grown_catalog():
    """merge="rrf" on CUDA: retrieval + beam search + fusion replayed from one graph per shape answer exactly as the
    same steps launched one by one, hits and misses, pipelined, and again after add_items grows the catalog and trie."""
    from models.ugt.heads import PrefixTrie

    model = make_model(2)
    rows = user_rows(12, seed=6)
    keys = [f"u{i}" for i in range(12)]
    cfg = {"device": "cuda", "dtype": "fp32", "cache_slots": 16, "beam_size": 20, "merge": "rrf",
           "batch_buckets": (1, 8, 32), "new_item_slots": 2}
    graphed = UGTInference(model, InferenceConfig(**cfg))
    eager = UGTInference(model, InferenceConfig(**cfg, heads_graph=False))

    def same(batches):
        pending = [graphed.submit_packed(graphed.row_vectors(rows[s]), graphed.exclusion_matrix(excludes_of(rows[s])),
                                         9, keys[s], [prefix_fingerprint(r) for r in rows[s]]) for s in batches]
        for p, s in zip(pending, batches, strict=True):
            want = eager.recommend(rows[s], excludes_of(rows[s]), 9, keys[s])
            got = p.result()
            assert [g.indices.tolist() for g in got] == [w.indices.tolist() for w in want]
            for g, w in zip(got, want, strict=True):
                np.testing.assert_allclose(g.scores, w.scores, rtol=1e-5, atol=1e-6)

    same([slice(0, 5), slice(3, 12), slice(0, 5), slice(11, 12)])  # misses, then hits, mixed sizes, in flight
    assert any(key.kind == "heads" for key in graphed.graphs)
    new_codes = np.array([[3, 3, 2]])
    known = (model.embed.item_codes[1:] - 1 - torch.tensor([0, 4, 8])).numpy()
    if (known == new_codes).all(1).any():
        new_codes = next(np.array([[a, b, c]]) for a in range(4) for b in range(4) for c in range(3)
                         if not (known == [a, b, c]).all(1).any())
    all_codes = np.concatenate([known, new_codes])
    for eng in (graphed, eager):
        trie = PrefixTrie(all_codes, SIZES)
        eng.add_items(new_codes, np.array([[1, 2]]), np.array([3]), trie)
    same([slice(0, 8), slice(4, 12)])
    heads = [key for key in graphed.graphs if key.kind == "heads"]
    assert heads and all(key.catalog[0] == NUM_ITEMS + 1 for key in heads)  # the old catalog's graphs are gone


def test_bad_settings_fail_at_start():
    model = make_model()
    with pytest.raises(ValueError, match="merge must be"):
        UGTInference(model, InferenceConfig(merge="best"))
    model.sid_head = None
    with pytest.raises(ValueError, match="semantic-ID head"):
        UGTInference(model, InferenceConfig(beam_size=10))


@pytest.mark.skipif(DEVICE != "cuda", reason="bf16 + CUDA graphs + the Triton kernel need a GPU")
def test_cuda_bf16_graphs_agree_with_cpu_fp32():
    model = make_model(3)
    rows = user_rows(11, seed=4)
    keys = [f"u{i}" for i in range(11)]
    cpu = UGTInference(model, InferenceConfig(device="cpu", dtype="fp32"))
    gpu = UGTInference(model, InferenceConfig(device="cuda", cache_slots=16))
    assert gpu.fused and gpu.graphs_on
    want = cpu.recommend(rows, excludes_of(rows), 10)
    for _ in range(2):  # the second pass decodes from the KV cache through the decode graph
        got = gpu.recommend(rows, excludes_of(rows), 10, keys)
        for g, w in zip(got, want, strict=True):
            assert len(set(g.indices[:5].tolist()) & set(w.indices.tolist())) >= 4
            np.testing.assert_allclose(g.scores, w.scores, atol=0.05)
    assert gpu.cache.hits == 11 and BatchDescriptor("decode_compact", 32) in gpu.graphs
    assert BatchDescriptor("prefill", 32) in gpu.graphs
    fp32 = UGTInference(model, InferenceConfig(device="cuda", dtype="fp32", cuda_graphs=True))
    for g, w in zip(fp32.recommend(rows, excludes_of(rows), 10), want, strict=True):
        assert g.indices.tolist() == w.indices.tolist()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    DEVICE != "cuda", reason="the overlapped path needs a GPU"))])
def test_pipelined_batches_in_flight_equal_one_at_a_time(device: str):
    """Several batches submitted before any result is read (a slot re-prefilled in between, mixed sizes)
    give exactly what one-at-a-time calls give: pinned blocks are not reused under a pending copy."""
    model = make_model(3)
    rows = user_rows(12, seed=5)
    keys = [f"u{i}" for i in range(12)]
    cfg = {"device": device, "dtype": "fp32", "cache_slots": 6, "batch_buckets": (1, 8, 32)}
    piped, serial = UGTInference(model, InferenceConfig(**cfg)), UGTInference(model, InferenceConfig(**cfg))
    batches = [slice(0, 5), slice(3, 11), slice(0, 5), slice(11, 12), slice(6, 12)]
    pending = []
    for s in batches:
        r = rows[s]
        vectors, excl = piped.row_vectors(r), piped.exclusion_matrix(excludes_of(r))
        pending.append(piped.submit_packed(vectors, excl, 7, keys[s], [prefix_fingerprint(x) for x in r]))
    assert all(p.n == len(rows[s]) for p, s in zip(pending, batches, strict=True))
    for p, s in zip(pending, batches, strict=True):
        got = p.result()
        want = serial.recommend(rows[s], excludes_of(rows[s]), 7, keys[s])
        assert [g.indices.tolist() for g in got] == [w.indices.tolist() for w in want]
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(g.scores, w.scores, rtol=1e-4, atol=1e-5)
    assert piped.cache.hits == serial.cache.hits > 0
    assert piped.submit_packed(np.empty((0, piped.width), np.int64), np.zeros((0, 1), np.int64), 7).result() == []


def test_compact_decode_equals_decode_of_the_full_rows():
    """An all-hit batch sends only each row's last event (8 columns, not ~6N): same user states."""
    model = make_model(4)
    rows = user_rows(6, seed=7)
    eng = UGTInference(model, InferenceConfig(device="cpu", dtype="fp32", cache_slots=8))
    keys = [f"u{i}" for i in range(6)]
    eng.recommend(rows, excludes_of(rows), 5, keys)  # prefill: the prefixes are cached
    slots, hits = eng.cache.assign(keys, [prefix_fingerprint(r) for r in rows])
    assert all(hits)
    vectors, excl = eng.row_vectors(rows), eng.exclusion_matrix(excludes_of(rows))
    full = eng.step("decode", eng.pack(vectors, excl, slots, 8))
    compact_host = eng.pack_compact(vectors, excl, slots, 8)
    assert compact_host.shape == (8, COMPACT_WIDTH + excl.shape[1])
    compact = eng.step("decode_compact", compact_host)
    torch.testing.assert_close(compact[:6], full[:6], rtol=0, atol=0)
    torch.testing.assert_close(compact_host[:6, COMPACT_WIDTH:], torch.as_tensor(excl))


def test_compiled_cpu_steps_give_the_eager_answers_and_never_recompile():
    """compile=True: prefill and decode run under torch.compile, compiled at construction. Batches of one (padded
    to two), misses, all-hit (compact) and mixed batches give the eager path's items and scores, and nothing is
    compiled again after start-up (a recompile in a forked serving engine would stall it for seconds)."""
    model = make_model(5)
    rows = user_rows(6, seed=9)
    later = []
    for r in rows:  # same events, a later request time: KV-cache hits
        r2 = {k: v.copy() for k, v in r.items()}
        r2["query_times"][0, int(r2["lengths"][0]) - 1] += 600
        later.append(r2)
    keys = [f"u{i}" for i in range(6)]
    eager = UGTInference(model, InferenceConfig(device="cpu", dtype="fp32", cache_slots=8, new_item_slots=2))
    compiled = UGTInference(model, InferenceConfig(device="cpu", dtype="fp32", cache_slots=8, compile=True,
                                                   new_item_slots=2))
    assert compiled.compiled and compiled.bucket(1) == 2 and eager.bucket(1) == 1
    steps = [([0], rows), ([1, 2, 3], rows), ([0, 1, 2, 3], later), ([4, 0, 5], later), ([0], later)]
    with torch._dynamo.config.patch(error_on_recompile=True):
        for users, source in steps:
            batch = [source[u] for u in users]
            got = compiled.recommend(batch, excludes_of(batch), 6, [keys[u] for u in users])
            want = eager.recommend(batch, excludes_of(batch), 6, [keys[u] for u in users])
            for g, w in zip(got, want, strict=True):
                assert g.indices.tolist() == w.indices.tolist()
                np.testing.assert_allclose(g.scores, w.scores, rtol=1e-4, atol=1e-5)
    assert compiled.cache.hits == eager.cache.hits == 6 and compiled.cache.misses == eager.cache.misses == 6
    # an item added while serving is read by the compiled steps in place: same answers, still no recompile
    code = unused_codes(model, 1)
    for engine in (eager, compiled):
        engine.add_items(code, np.array([[2, 3]]), np.array([4]))
    times = 1_600_000_000 + np.arange(4) * 100
    fresh = [history_row(np.array([3, 9, NUM_ITEMS + 1, 5]), times, np.full(4, 4), 12, 10, int(times[-1]) + 60)]
    with torch._dynamo.config.patch(error_on_recompile=True):
        got = compiled.recommend(fresh * 2, excludes_of(fresh * 2), NUM_ITEMS + 1, ["n1", "n2"])
    want = eager.recommend(fresh * 2, excludes_of(fresh * 2), NUM_ITEMS + 1, ["n1", "n2"])
    assert got[0].indices.tolist() == want[0].indices.tolist() and NUM_ITEMS + 1 not in got[0].indices.tolist()
    np.testing.assert_allclose(got[0].scores, want[0].scores, rtol=1e-4, atol=1e-5)
    # A second model in the same process (the router serves several) gets its own compiled steps. Its tensors have
    # the first model's shapes and only its MoE routing (top-2, a Python int) differs: with only tensor guards kept,
    # a shared cache would run the first model's top-1 graph on it.
    other = UGTInference(make_model(6, top_k=2), InferenceConfig(device="cpu", dtype="fp32", cache_slots=4,
                                                                  compile=True))
    with torch._dynamo.config.patch(error_on_recompile=True):
        for engine in (compiled, other):
            got = engine.recommend(rows[:3], excludes_of(rows[:3]), 6, keys[:3])
            want = UGTInference(engine.model, InferenceConfig(device="cpu", dtype="fp32")).recommend(
                rows[:3], excludes_of(rows[:3]), 6)
            for g, w in zip(got, want, strict=True):
                np.testing.assert_allclose(g.scores, w.scores, rtol=1e-4, atol=1e-5)


def unused_codes(model: UGT, n: int) -> np.ndarray:
    """n semantic IDs no trained item has (new items need their own: the dedup level keeps IDs unique)."""
    taken = {tuple(c) for c in (model.embed.item_codes[1:] - 1 - torch.tensor([0, 4, 8])).tolist()}
    free = [c for c in np.ndindex(*SIZES) if c not in taken]
    return np.asarray(free[:n], np.int64)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    DEVICE != "cuda", reason="needs a GPU"))])
def test_new_items_are_embedded_by_semantic_id_retrieved_generated_and_read_in_histories(device: str):
    """add_items: a new item's row is what the model gives a trained item with the same codes and metadata and no
    ID row; retrieval returns it (and masks it when excluded), the constrained beam search can generate it once the
    trie holds it, a history that holds it changes the user's state (on CUDA: through graphs captured before the
    item came), and the slots run out with a clear error."""
    from models.ugt.heads import PrefixTrie

    model = make_model(3)
    rows = user_rows(4, seed=5)
    plain = UGTInference(model, InferenceConfig(device=device, dtype="fp32"))
    eng = UGTInference(model, InferenceConfig(device=device, dtype="fp32", new_item_slots=3, beam_size=200,
                                              merge="rrf"))
    assert eng.capacity == NUM_ITEMS + 3 and eng.num_items == NUM_ITEMS
    torch.testing.assert_close(eng.table[: NUM_ITEMS + 1], plain.table, rtol=0, atol=0)
    before = eng.recommend(rows, excludes_of(rows), NUM_ITEMS + 3)
    assert all(len(t.indices) <= NUM_ITEMS and t.indices.max() <= NUM_ITEMS for t in before)  # empty slots unseen

    # the row: trained item 7's codes and metadata with its ID row zeroed, in a copy of the model
    j = 7
    zeroed = make_model(3)
    with torch.no_grad():
        zeroed.embed.item_emb.weight[j] = 0
    codes_j = (model.embed.item_codes[j] - 1 - torch.tensor([0, 4, 8])).numpy()[None]
    genres_j = model.embed.item_genres[j].numpy()[None]
    years_j = model.embed.item_year[j].numpy()[None]
    (first,) = eng.add_items(codes_j, genres_j, years_j)  # no trie: only the table row is checked here
    assert first == NUM_ITEMS + 1 and eng.num_items == NUM_ITEMS + 1
    torch.testing.assert_close(eng.table[first].cpu(), zeroed.item_embeddings()[j].detach(), rtol=1e-5, atol=1e-6)

    # retrieval over the grown catalog, exclusions included
    new_codes = unused_codes(model, 1)
    all_codes = np.concatenate([(model.embed.item_codes[1:] - 1 - torch.tensor([0, 4, 8])).numpy(), codes_j * 0 - 1,
                                new_codes])
    # the trie indexes every served item: the first new item shares item 7's codes, so the trie leaves it out
    keep = np.ones(len(all_codes), bool)
    keep[NUM_ITEMS] = False
    trie = PrefixTrie(all_codes[keep], SIZES, item_index=np.arange(1, len(all_codes) + 1)[keep])
    (second,) = eng.add_items(new_codes, np.array([[1, 2]]), np.array([3]), trie)
    everything = eng.recommend(rows, excludes_of(rows), NUM_ITEMS + 3)
    assert all({first, second} <= set(t.indices.tolist()) for t in everything)
    masked = eng.recommend(rows, [np.union1d(e, [second]) for e in excludes_of(rows)], NUM_ITEMS + 3)
    assert all(second not in t.indices.tolist() for t in masked)
    user, _ = eng.users(eng.pack(eng.row_vectors(rows), eng.exclusion_matrix(excludes_of(rows)), [0] * 4, 4),
                        [MISS] * 4)
    items, logp = eng.generate(user, torch.zeros(4, 1, dtype=torch.long, device=device), 200)  # all fit in the beam
    assert all(second in row.tolist() and first not in row.tolist() for row in items)

    # a history that ends with the new item: embedded, not dropped
    items = np.array([3, 5, second])
    times = np.array([1_600_000_000, 1_600_000_100, 1_600_000_200])
    with_new = history_row(items, times, np.array([4, 4, 4]), 12, 10, 1_600_000_300)
    with_other = history_row(np.array([3, 5, 9]), times, np.array([4, 4, 4]), 12, 10, 1_600_000_300)
    # (clone: on CUDA a replayed graph returns its static output, which the next replay overwrites)
    a = eng.users(eng.pack(eng.row_vectors([with_new]), np.zeros((1, 1), np.int64), [0], 1), [MISS])[0].clone()
    b = eng.users(eng.pack(eng.row_vectors([with_other]), np.zeros((1, 1), np.int64), [0], 1), [MISS])[0]
    assert not torch.allclose(a, b)

    eng.add_items(unused_codes(model, 2)[1:], np.zeros((1, 1), np.int64), np.zeros(1, np.int64))
    with pytest.raises(ValueError, match="new_item_slots"):
        eng.add_items(new_codes, np.zeros((1, 1), np.int64), np.zeros(1, np.int64))


def test_compile_without_a_cpp_compiler_fails_at_start_and_says_what_to_do(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(ValueError, match="C\\+\\+ compiler"):
        UGTInference(make_model(), InferenceConfig(device="cpu", compile=True))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    DEVICE != "cuda", reason="needs a GPU"))])
def test_trie_edits_reach_the_served_trie_in_place(device: str):
    """The live catalog hands the engine a whole trie once, then only edits: the served trie (on the GPU: the same
    tensors the heads graph reads) is written in place, and the beam search generates the items each edit adds."""
    from models.ugt.heads import PrefixTrie

    model = make_model(3)
    rows = user_rows(4, seed=8)
    eng = UGTInference(model, InferenceConfig(device=device, dtype="fp32", new_item_slots=3, beam_size=200,
                                              merge="rrf", cache_slots=8))
    trained = (model.embed.item_codes[1:] - 1 - torch.tensor([0, 4, 8])).numpy()
    live = PrefixTrie(trained, SIZES).with_room(3)
    new = unused_codes(model, 3)
    live.add(new[:1], np.array([NUM_ITEMS + 1]))
    first = eng.add_items(new[:1], np.zeros((1, 1), np.int64), np.zeros(1, np.int64), live.clone())
    keys = [f"u{i}" for i in range(4)]
    eng.recommend(rows, excludes_of(rows), 9, keys)  # graphs (on CUDA) captured over the trie as it is now
    served = eng.model.trie
    tables = [t.data_ptr() for t in (*served.allowed, *served.child, served.leaf_item)]
    edit = live.add(new[1:], np.array([NUM_ITEMS + 2, NUM_ITEMS + 3]))
    second = eng.add_items(new[1:], np.zeros((2, 1), np.int64), np.zeros(2, np.int64), trie_edits=[edit])
    assert eng.model.trie is served and tables == [t.data_ptr() for t in (*served.allowed, *served.child,
                                                                            served.leaf_item)]
    user, _ = eng.users(eng.pack(eng.row_vectors(rows), eng.exclusion_matrix(excludes_of(rows)), [0] * 4, 4),
                        [MISS] * 4)
    items, _ = eng.generate(user, torch.zeros(4, 1, dtype=torch.long, device=device), 200)
    assert all({*first.tolist(), *second.tolist()} <= set(row.tolist()) for row in items)
    answers = eng.recommend(rows, excludes_of(rows), NUM_ITEMS + 3, keys)
    assert all({*first.tolist(), *second.tolist()} <= set(a.indices.tolist()) for a in answers)
