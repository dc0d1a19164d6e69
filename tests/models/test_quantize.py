"""INT8 inference (models/ugt/quantize.py) behind the engine: the Linear forms compute what the model does, and
an int8 engine ranks as the fp32 one does on a small trained UGT (mean top-10 overlap >= TOP10_OVERLAP)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.checkpoint import load_checkpoint
from models.data import build_sequences, history_row
from models.train import fit
from models.train_config import TrainConfig
from models.ugt.inference import InferenceConfig, UGTInference
from models.ugt.quantize import linear_forms
from tests.models.conftest import random_dataset

TOP10_OVERLAP = 0.8  # measured 0.97 on this model (torch 2.15, x86 CPU); int8 may swap near-ties at the end
MAX_LEN = 16


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A UGT trained a few epochs on synthetic data (2 layers, 2 MoE experts), and every user's next-item request."""
    data = build_sequences(random_dataset(users=60, items=50, events=20, seed=1), "stable")
    out = tmp_path_factory.mktemp("int8")
    cfg = TrainConfig(name="q", model="ugt", max_len=MAX_LEN, batch_size=16, max_epochs=4, patience=10,
                      progress=False, device="cpu", out_dir=str(out), num_negatives=0, temperature=0.1,
                      eval_batch_size=64, model_config={
                          "d_model": 32, "num_layers": 2, "num_heads": 2, "dqk": 16, "dv": 16, "dropout": 0.0,
                          "embedding": {"item_repr": "id"}, "multiscale": {"long_groups": 2, "max_long": 8},
                          "moe": {"d_ff": 64, "num_experts": 2, "top_k": 1}, "heads": {"semantic_id": False}})
    fit(cfg, data=data)
    model = load_checkpoint(out / "checkpoint.pt", data=data)[0]
    rows = [history_row(s[:-1], t[:-1], r[:-1], MAX_LEN, 8, query_time=int(t[-1]))
            for s, t, r in zip(data.items, data.times, data.ratings, strict=True)]
    excludes = [np.unique(s[:-1]) for s in data.items]
    return model, rows, excludes


def _top10(engine: UGTInference, rows, excludes) -> list[np.ndarray]:
    return [t.indices for t in engine.recommend(rows, excludes, 10)]


def test_linear_forms_compute_what_the_model_does(served):
    model, rows, excludes = served
    plain = UGTInference(model, InferenceConfig(device="cpu", dtype="fp32"))
    formed = UGTInference(model, InferenceConfig(device="cpu", dtype="fp32"))
    linear_forms(formed.model)
    vectors = plain.row_vectors(rows)
    for engine in (plain, formed):
        engine.last_users = engine.users(engine.pack(vectors, engine.exclusion_matrix(excludes), [0] * len(rows),
                                                     len(rows), fresh=True), ["miss"] * len(rows))[0]
    assert torch.allclose(plain.last_users, formed.last_users, atol=1e-5)


def test_int8_ranks_as_fp32_does(served):
    model, rows, excludes = served
    fp32 = UGTInference(model, InferenceConfig(device="cpu", dtype="fp32"))
    int8 = UGTInference(model, InferenceConfig(device="cpu", dtype="fp32", quantize="int8", cache_slots=8))
    assert isinstance(int8.model.layers[0].attn.o, torch.ao.nn.quantized.dynamic.Linear)
    overlap = [len(set(a.tolist()) & set(b.tolist())) / 10
               for a, b in zip(_top10(fp32, rows, excludes), _top10(int8, rows, excludes), strict=True)]
    assert np.mean(overlap) >= TOP10_OVERLAP, np.mean(overlap)
    for top, seen in zip(_top10(int8, rows, excludes), excludes, strict=True):  # the KV cache path, history excluded
        assert len(top) == 10 and not set(top.tolist()) & set(seen.tolist())


def test_int8_settings_fail_at_start(served):
    model = served[0]
    with pytest.raises(ValueError, match="quantize must be"):
        UGTInference(model, InferenceConfig(quantize="int4"))
    with pytest.raises(ValueError, match="CPU engine in fp32"):
        UGTInference(model, InferenceConfig(quantize="int8", dtype="bf16"))
