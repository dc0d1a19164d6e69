"""Shared tiny fixtures for the sequence-model tests (CPU, seconds)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from models.data import build_sequences, make_split


class TinyDataset:
    """Hand-made dataset in the contracts.datasets shape, with tied timestamps."""

    def __init__(self, ratings: pd.DataFrame, items: pd.DataFrame, name: str = "tiny"):
        self.ratings, self.items, self.name = ratings, items, name


def random_dataset(users: int = 12, items: int = 30, events: int = 15, seed: int = 0) -> TinyDataset:
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(users):
        chosen = rng.choice(items, size=events, replace=False) + 1
        t0 = 1_000_000 + u * 1000
        times = t0 + np.sort(rng.integers(0, 5000, size=events))
        for i, t in zip(chosen, times, strict=True):
            rows.append((str(u), str(i), int(t), float(rng.integers(1, 6))))
    ratings = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp", "rating"])
    ratings["row"] = range(len(ratings))
    genres = ["Action", "Comedy", "Drama", "Horror"]
    catalog = pd.DataFrame({
        "item_id": [str(i) for i in range(1, items + 1)],
        "title": [f"Movie {i}" for i in range(1, items + 1)],
        "year": pd.array([1990 + i % 20 for i in range(1, items + 1)], dtype="Int64"),
        "genres": [[genres[i % 4], genres[(i * 7) % 4]] if i % 3 else [genres[i % 4]] for i in range(1, items + 1)],
    })
    return TinyDataset(ratings, catalog)


@pytest.fixture
def tiny_data():
    return build_sequences(random_dataset(), "stable")


@pytest.fixture
def tiny_batch(tiny_data):
    split = make_split(tiny_data, "train", max_len=10, max_long=8)
    rows = split.rows(np.arange(4))
    return {k: torch.as_tensor(v) for k, v in rows.items()}
