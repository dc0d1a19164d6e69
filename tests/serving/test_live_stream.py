"""Live items scored by their stream vectors in serving (serving/live_stream.py): which events count, and that a
served row scores a user exactly as the cold-start bench's per-day sums score the same events
(models/ugt/stream_items.py)."""

from __future__ import annotations

import numpy as np
import torch

from models.data import build_sequences
from models.ugt.embedding import EmbeddingConfig
from models.ugt.model import UGT, UGTConfig
from models.ugt.runner.batch import BatchLayout
from models.ugt.stream_items import DailySums
from serving.live_stream import LiveStreamVectors, StreamEvents, new_events
from tests.models.conftest import random_dataset


def test_only_uncounted_live_item_events_with_a_state_before_them_count():
    counted = {("u1", 32)}
    assert new_events([31, 5, 31, 32, 7, 33], live_from=31, counted=counted, user="u1") == [2, 5]
    # position 0 has no state before it; 31 twice counts once; 32 was counted for u1 already
    assert new_events([5, 32], live_from=31, counted=counted, user="u2") == [1]
    assert new_events([1, 2, 3], live_from=31, counted=set(), user="u1") == []


def served_model(k: float = 4.0) -> tuple[UGT, int]:
    data = build_sequences(random_dataset(), "stable")
    torch.manual_seed(0)
    config = UGTConfig(num_items=data.num_items, d_model=8, num_layers=1, num_heads=1, dqk=4, dv=4,
                       embedding=EmbeddingConfig(stream_k=k, stream_center=0.5))
    model = UGT(config, data.item_genres, data.item_year_bucket).eval()
    with torch.no_grad():
        model.embed.stream_mean.copy_(torch.randn(8) * 0.1)
    model.embed.reserve(2)  # what the engine does for new_item_slots
    ids = torch.tensor([data.num_items + 1, data.num_items + 2])
    model.embed.set_items(ids, None, np.array([[1, 2], [3, 0]]), np.array([3, 3]))
    return model, data.num_items


def test_a_live_items_served_row_scores_as_the_bench_scores_it():
    model, trained = served_model()
    table = model.embed.output_vectors(torch.arange(trained + 3)).float().clone()
    live = LiveStreamVectors(model, BatchLayout(10, 8, torch.device("cpu")), table, max_len=10, max_long=8)
    new = trained + 1
    items = np.array([3, 7, new, 9, 4])
    times = np.arange(5) * 86400 + 1_000_000
    changed = live.observe("u1", items, times, np.full(5, 3))
    assert changed.tolist() == [new]
    assert torch.equal(table[new], live.rows(np.array([new]))[0])  # the served table's row rewritten
    assert live.observe("u1", items, times, np.full(5, 3)).size == 0  # the same history again: counted once
    live.observe("u2", np.array([5, 6, new]), times[:3], np.full(3, 3))
    assert live.sums.counts[new] == 2
    # the bench's per-day sums holding the same two events, read on a later day
    content = model.embed.output_vectors(torch.arange(trained + 3)).float()
    daily = DailySums(np.array([new]), first_day=0, sums=torch.as_tensor(live.sums.sums[[new]])[None],
                      counts=torch.tensor([[2]]), k=4.0, center=model.embed.stream_mean.float(), gamma=0.5)
    state = torch.nn.functional.normalize(torch.randn(1, 8), dim=-1)
    bench = daily.rescore(state @ content.T, state, content, torch.tensor([10 * 86400]))[0, new]  # cosine replaced
    served = (state @ live.rows(np.array([new])).T)[0, 0]
    assert torch.isclose(bench, served, atol=1e-5)
    assert not torch.allclose(live.rows(np.array([new])), content[new])  # the stream moved it
    assert torch.allclose(live.rows(np.array([new + 1])), content[new + 1])  # no event yet: its content row


def test_packed_prefix_rows_count_as_the_history_itself_and_once_per_user_and_item():
    """What a worker sends (``pending``'s packed rows) gives the engine the same sums as its own ``observe``."""
    model, trained = served_model()
    new = trained + 1
    items, times, ratings = np.array([3, 7, new, 9, new + 1]), np.arange(5) * 86400 + 1_000_000, np.full(5, 3)
    layout = BatchLayout(10, 8, torch.device("cpu"))

    def fresh() -> LiveStreamVectors:
        table = model.embed.output_vectors(torch.arange(trained + 3)).float().clone()
        return LiveStreamVectors(model, layout, table, max_len=10, max_long=8)

    direct, remote = fresh(), fresh()
    direct.observe("u1", items, times, ratings)
    sent: set[tuple[str, int]] = set()
    events = remote.pending("u1", items, times, ratings, sent)  # the worker's own set, not the engine's
    assert events.items == [new, new + 1] and events.matrix(layout.width).shape == (2, layout.width)
    twice = StreamEvents()
    twice.extend(events)
    twice.extend(events)  # two workers sent the same events: counted once
    assert sorted(remote.observe_packed(twice).tolist()) == [new, new + 1]
    assert remote.observe_packed(events).size == 0
    assert np.array_equal(remote.sums.counts, direct.sums.counts)
    assert np.allclose(remote.sums.sums, direct.sums.sums, atol=1e-6)
    assert torch.allclose(remote.table, direct.table)
