"""A batch padded to its own longest row gives the same loss and scores as one padded to the model's window.

Why it holds (models/data.py batch_width): rows are left-aligned, positions count from the left, attention is causal
with padded keys masked, and HSTU's attention normaliser is the configured max_len, not the tensor width. If any of
that changes, per-batch padding would silently change results (ML-1M's included), so every model is checked.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.checkpoint import build_model
from models.data import batch_width, build_sequences, iterate_batches, make_split
from models.eval import batch_to_device, last_states
from models.losses import sampled_softmax_loss
from models.train_config import TrainConfig
from tests.models.conftest import random_dataset

WINDOW = 48

MODELS = {
    "sasrec": {"embedding_dim": 16, "num_blocks": 2, "num_heads": 1, "ffn_hidden_dim": 16, "dropout": 0.0},
    "hstu": {"embedding_dim": 16, "num_blocks": 2, "num_heads": 2, "dqk": 8, "dv": 8, "dropout": 0.0,
             "input_dropout": 0.0},
    "ugt": {"d_model": 16, "num_layers": 2, "num_heads": 2, "dqk": 8, "dv": 8, "dropout": 0.0,
            "embedding": {"item_repr": "id", "dropout": 0.0}, "multiscale": {"long_groups": 2, "max_long": 16},
            "moe": {"d_ff": 16, "num_experts": 2, "top_k": 1}, "heads": {"semantic_id": False}},
}


def short_sequences():
    """Users of 5..20 events: every batch is far shorter than the window."""
    data = build_sequences(random_dataset(users=16, items=40, events=20, seed=3), "stable")
    rng = np.random.default_rng(0)
    for u in range(data.num_users):
        n = int(rng.integers(5, 21))
        data.items[u], data.times[u], data.ratings[u] = data.items[u][:n], data.times[u][:n], data.ratings[u][:n]
    return data


def test_batch_width_is_the_longest_row_rounded_up_and_capped():
    assert batch_width(np.array([3, 9, 2]), 200) == 16
    assert batch_width(np.array([16]), 200) == 16
    assert batch_width(np.array([197]), 200) == 200
    assert batch_width(np.array([5]), 4) == 4


@pytest.mark.parametrize("model_name", sorted(MODELS))
@pytest.mark.parametrize("split_name", ["train", "test"])
def test_trimmed_and_full_window_batches_give_the_same_loss_and_scores(model_name: str, split_name: str):
    torch.manual_seed(0)
    data = short_sequences()
    cfg = TrainConfig(model=model_name, max_len=WINDOW, model_config=MODELS[model_name], compile=False, bf16=False)
    model = build_model(cfg, data).eval()
    split = make_split(data, split_name, WINDOW, max_long=16 if model_name == "ugt" else 0)
    full = next(iterate_batches(split, 8, shuffle=False, trim=False))
    trimmed = next(iterate_batches(split, 8, shuffle=False))
    assert full["ids"].shape[1] == WINDOW and trimmed["ids"].shape[1] < WINDOW
    with torch.no_grad():
        outputs = []
        for batch in (full, trimmed):
            user, _ = model(batch_to_device(batch, torch.device("cpu")))
            table = model.item_embeddings()
            if split_name == "train":
                outputs.append(sampled_softmax_loss(user, torch.as_tensor(batch["targets"]), table, 0, 0.1))
            else:
                outputs.append(last_states(user, torch.as_tensor(batch["lengths"])) @ table.T)
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-5, atol=1e-5)
