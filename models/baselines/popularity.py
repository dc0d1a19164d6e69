"""Most-popular baseline: every user gets the items with the most training interactions (history masked)."""

from __future__ import annotations

import numpy as np
import torch

from models.data import SequenceData


class Popularity:
    """Scores = training interaction counts; no parameters, same eval path as the neural models."""

    def __init__(self, data: SequenceData, split: str = "test"):
        counts = data.item_popularity(split).astype(np.float64)
        counts[0] = -np.inf  # padding is never recommended
        self.scores = torch.as_tensor(counts)

    def score(self, batch_size: int) -> torch.Tensor:
        """(batch_size, num_items + 1) scores, the same row for every user."""
        return self.scores.unsqueeze(0).expand(batch_size, -1)
