"""Graphs captured at engine start (models/ugt/runner/warmup.py): after it, a served batch of hits, appends and
misses captures nothing new, answers as before, and the KV cache's entries and counters are untouched.
The capture needs CUDA (skipped without a GPU); the widths and the CPU no-op run everywhere."""

from __future__ import annotations

import pytest
import torch

from models.ugt.inference import InferenceConfig, UGTInference
from models.ugt.runner.warmup import capture_graphs, exclusion_widths
from tests.models.test_inference import excludes_of, make_model
from tests.models.test_kv_append import assert_same_answers, histories, row_of

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="graph capture needs CUDA")


def test_exclusion_widths_are_the_padded_powers_of_two_up_to_the_longest_history():
    assert exclusion_widths(0) == [8]
    assert exclusion_widths(8) == [8]
    assert exclusion_widths(9) == [8, 16]
    assert exclusion_widths(22) == [8, 16, 32]


def test_without_graphs_nothing_runs_and_the_cache_is_untouched():
    engine = UGTInference(make_model(1), InferenceConfig(device="cpu", dtype="fp32", cache_slots=4))
    assert capture_graphs(engine, [10], 22) == 0
    assert engine.cache.stats()["miss"] == 0 and not engine.graphs


@CUDA
def test_after_the_warm_up_served_batches_capture_nothing_and_answer_the_same():
    cfg = {"device": "cuda", "dtype": "fp32", "batch_buckets": (1, 8, 32)}
    warm = UGTInference(make_model(1), InferenceConfig(**cfg, cache_slots=16))
    cold = UGTInference(make_model(1), InferenceConfig(**cfg, cache_slots=16))
    count = capture_graphs(warm, [8], 12 + 10)
    assert count == len(warm.graphs) > 0
    assert {k: warm.cache.stats()[k] for k in ("hit", "append", "miss")} == {"hit": 0, "append": 0, "miss": 0}
    users = histories(7)
    keys = [f"u{i}" for i in range(7)]
    for lengths in ([3, 4, 6, 8, 5, 12, 11], [4, 5, 6, 9, 7, 13, 11]):  # misses, then hits, appends and misses
        rows = [row_of(h, n) for h, n in zip(users, lengths, strict=True)]
        got = warm.recommend(rows, excludes_of(rows), 8, keys)
        assert_same_answers(got, cold.recommend(rows, excludes_of(rows), 8, keys), 1e-4)
    assert len(warm.graphs) == count  # every shape those batches needed was captured at start
