"""Multi-scale input: long-term compressed history, the recent sequence, and the real-time context.

- Recent sequence (fine): one token per event for the last ``recent_len`` events (the HSTU window).
- Long-term history (coarse): the events older than the window, which HSTU drops, are pooled into
  ``long_groups`` tokens. As in the seed's ``compress_history``, early behaviour is coarse and recent
  behaviour fine: group sizes shrink linearly toward the present (the oldest group covers the most
  events). Each token is the mean of its events' embeddings, projected, with its own type (user group).
- Real-time context: every position is a request in training (it predicts the next event), so the
  request's context -- hour of day, day of week and the time since the last event, from the query time --
  is embedded and added to that position's token. At serving it is the request's own context.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from contracts.tokenizer import NUM_TIME_GAP_BUCKETS, TOKEN_GROUP_USER


@dataclass
class MultiScaleConfig:
    recent_len: int = 200  # fine-grained window (one token per event)
    long_groups: int = 16  # coarse tokens for older events (0 = off)
    max_long: int = 1024  # older events considered at most
    use_context: bool = True  # real-time context (hour, weekday, gap to the request)


def compress_history(counts: torch.Tensor, max_events: int, num_groups: int) -> torch.Tensor:
    """Group index of each older event: (B, max_events) long, -1 for padding.

    ``counts`` (B,) is how many older events each row has (left-aligned, oldest first). Group g (0 =
    oldest) gets a share of the events proportional to ``num_groups - g``: early behaviour is pooled
    coarsely, behaviour near the recent window finely. Rows with fewer events than groups leave some
    groups empty.
    """
    weights = torch.arange(num_groups, 0, -1, dtype=torch.float64, device=counts.device)
    bounds = torch.cumsum(weights, 0) / weights.sum()  # (G,) right edges in (0, 1]
    pos = torch.arange(max_events, device=counts.device, dtype=torch.float64).unsqueeze(0)
    frac = (pos + 0.5) / counts.clamp(min=1).unsqueeze(1).to(torch.float64)
    group = torch.searchsorted(bounds, frac.contiguous(), right=False).clamp(max=num_groups - 1)
    return torch.where(pos < counts.unsqueeze(1), group, torch.full_like(group, -1))


class LongTermCompressor(nn.Module):
    """Pools older events into ``long_groups`` tokens (B, G, D) with their validity and times."""

    def __init__(self, d_model: int, config: MultiScaleConfig):
        super().__init__()
        self.config = config
        self.proj = nn.Linear(d_model, d_model)
        self.group_emb = nn.Embedding(max(1, config.long_groups), d_model)
        nn.init.trunc_normal_(self.group_emb.weight, std=0.02)

    def forward(self, event_vectors: torch.Tensor, long_ids: torch.Tensor, long_times: torch.Tensor):
        """event_vectors: (B, E, D) embeddings of the older events. Returns tokens, valid, times."""
        B, E, D = event_vectors.shape
        G = self.config.long_groups
        counts = (long_ids != 0).sum(1)
        group = compress_history(counts, E, G)  # (B, E)
        slot = group.clamp(min=0)
        keep = (group >= 0).to(event_vectors.dtype).unsqueeze(-1)
        sums = event_vectors.new_zeros(B, G, D).scatter_add(1, slot.unsqueeze(-1).expand(B, E, D), event_vectors * keep)
        n = event_vectors.new_zeros(B, G).scatter_add(1, slot, keep.squeeze(-1))
        valid = n > 0
        tokens = self.proj(sums / n.clamp(min=1).unsqueeze(-1)) + self.group_emb.weight.unsqueeze(0)
        tokens = tokens * valid.unsqueeze(-1).to(tokens.dtype)
        # A group's time is its latest event (drives the relative time bias).
        times = torch.zeros(B, G, dtype=long_times.dtype, device=long_times.device).scatter_reduce(
            1, slot, torch.where(group >= 0, long_times, torch.zeros_like(long_times)), reduce="amax", include_self=True
        )
        types = torch.full((B, G), TOKEN_GROUP_USER, dtype=torch.long, device=long_ids.device)
        return tokens, valid, times, types


class RealTimeContext(nn.Module):
    """Embeds the request context of each position from its query time and gap bucket."""

    def __init__(self, d_model: int):
        super().__init__()
        self.hour = nn.Embedding(24, d_model)
        self.weekday = nn.Embedding(7, d_model)
        self.gap = nn.Embedding(NUM_TIME_GAP_BUCKETS, d_model)
        for emb in (self.hour, self.weekday, self.gap):
            nn.init.trunc_normal_(emb.weight, std=0.02)

    def forward(self, query_times: torch.Tensor, query_gaps: torch.Tensor) -> torch.Tensor:
        hours = (query_times // 3600) % 24
        days = (query_times // 86400 + 3) % 7  # 1970-01-01 was a Thursday: 0 = Monday
        return self.hour(hours) + self.weekday(days) + self.gap(query_gaps)
