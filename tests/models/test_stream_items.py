"""Stream vectors of items without an ID row (models/ugt/stream_items.py): the blend, the running sums serving keeps,
and the per-day sums evaluation reads (a row sees only the days before its own)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models.data import build_sequences
from models.ugt.model import UGT, UGTConfig
from models.ugt.stream_items import DAY, DailySums, StreamSums, background_sums, blend, daily_sums
from tests.models.conftest import random_dataset


def test_blend_keeps_the_content_vector_without_events_and_trusts_the_stream_as_they_add_up():
    content = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    sums = torch.tensor([[0.0, 5.0], [0.0, 5.0], [0.0, 5.0]])
    out = blend(content, sums, torch.tensor([0, 2, 1000]), k=2.0)
    assert torch.allclose(out[0], content[0])
    assert torch.allclose(out[1], F.normalize(torch.tensor([0.5, 0.5]), dim=0))  # n == k: both weigh the same
    assert out[2, 1] > 0.99  # many events: the stream's direction
    assert torch.allclose(out.norm(dim=-1), torch.ones(3))
    with pytest.raises(ValueError, match="stream_k"):
        blend(content, sums, torch.zeros(3), k=0.0)


def test_the_scale_shortens_stream_rows_and_keeps_their_direction():
    content = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    sums = torch.tensor([[0.0, 5.0], [3.0, 0.0]])
    counts = torch.tensor([2, 7])
    full, short = blend(content, sums, counts, k=2.0), blend(content, sums, counts, k=2.0, scale=0.5)
    assert torch.allclose(short, 0.5 * full)
    with pytest.raises(ValueError, match="stream_scale"):
        blend(content, sums, counts, k=2.0, scale=0.0)
    running = StreamSums(capacity=2, d_model=2, k=2.0, scale=0.5)
    running.track(np.array([1, 2]))
    running.add(np.array([1, 2]), np.array([[0.0, 1.0], [1.0, 0.0]]))
    assert torch.allclose(running.vectors(np.array([1, 2]), content).norm(dim=-1), torch.full((2,), 0.5))


def test_running_sums_keep_only_tracked_items_and_give_their_blended_rows():
    sums = StreamSums(capacity=5, d_model=2, k=1.0)
    sums.track(np.array([4, 5]))
    changed = sums.add(np.array([1, 4, 4, 9, 0]), np.array([[1.0, 0], [0, 1.0], [0, 3.0], [1, 1], [1, 1]]))
    assert changed.tolist() == [4]  # item 1 has an ID row, 9 is out of range, 0 is padding
    assert sums.counts.tolist() == [0, 0, 0, 0, 2, 0]
    rows = sums.vectors(np.array([4, 5]), torch.tensor([[1.0, 0.0], [1.0, 0.0]]))
    assert torch.allclose(rows[0], F.normalize(torch.tensor([1 / 3, 2 / 3]), dim=0))  # w = 2 / (2 + 1)
    assert torch.allclose(rows[1], torch.tensor([1.0, 0.0]))  # no event yet: its content row


def test_day_sums_count_an_event_from_the_next_day_on():
    sums = torch.zeros(4, 1, 2)
    counts = torch.zeros(4, 1, dtype=torch.long)
    sums[2:, 0] = torch.tensor([0.0, 1.0])  # an event on day first + 1: seen from day first + 2
    counts[2:, 0] = 1
    daily = DailySums(np.array([3]), first_day=10, sums=sums, counts=counts, k=1.0)
    _, n = daily.at(torch.tensor([10 * DAY, 11 * DAY + 5, 12 * DAY, 99 * DAY]))
    assert n[:, 0].tolist() == [0, 0, 1, 1]
    scores = torch.zeros(2, 5)
    table = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    state = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    out = daily.rescore(scores, state, table, torch.tensor([11 * DAY, 12 * DAY]))
    assert out[0, 3] == pytest.approx(0.0)  # no event before day 11: the content row (orthogonal to the state)
    assert out[1, 3] == pytest.approx(float(F.normalize(torch.tensor([0.5, 0.5]), dim=0)[1]))
    assert out[:, [0, 1, 2, 4]].abs().sum() == 0  # other items keep their scores


def test_daily_sums_hold_every_event_of_the_tracked_items_once():
    data = build_sequences(random_dataset(), "stable")
    torch.manual_seed(0)
    model = UGT(UGTConfig(num_items=data.num_items, d_model=8, num_layers=1, num_heads=1, dqk=4, dv=4),
                data.item_genres, data.item_year_bucket).eval()
    items = np.zeros(data.num_items + 1, bool)
    items[[1, 2, 3]] = True
    daily = daily_sums(model, data, items, max_len=10, max_long=8)
    events = sum(int(np.isin(s[1:], [1, 2, 3]).sum()) for s in data.items)  # a first event has no state before it
    assert int(daily.counts[-1].sum()) == events
    assert daily.items.tolist() == [1, 2, 3]
    assert bool((daily.counts[1:] >= daily.counts[:-1]).all())  # cumulated over days


def test_the_background_is_the_softmax_pull_of_the_days_before_and_comes_out_of_the_stream_sum():
    # one new item (table row 3) with one event's state on day 10 (row 1) pointing along y
    sums = torch.zeros(4, 1, 2)
    counts = torch.zeros(4, 1, dtype=torch.long)
    sums[2:, 0] = torch.tensor([0.0, 1.0])
    counts[2:, 0] = 1
    daily = DailySums(np.array([3]), first_day=10, sums=sums, counts=counts, k=1.0)
    table = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.6, 0.8], [1.0, 0.0]])
    states = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.6, 0.8]])
    rows = torch.tensor([1, 2, 3])  # events on days 10, 11, 12
    got = background_sums(daily, table, states, rows, temperature=0.5)
    want = torch.zeros(4, 1, 2)
    vectors = daily.vectors_by_day(table)  # the item's row as of each day: content on day 10, stream after
    for u, r in zip(states, rows.tolist(), strict=True):
        logits = torch.stack([torch.tensor(float("-inf")), u @ table[1], u @ table[2], vectors[r - 1, 0] @ u])
        want[r:] += torch.softmax(logits / 0.5, dim=0)[3] * u
    assert torch.allclose(got, want, atol=1e-6)
    assert got[0].abs().sum() == 0 and got[1].abs().sum() > 0  # the day-10 event counts from row 1 on
    daily.background, daily.background_share = got, 0.5
    scores = daily.rescore(torch.zeros(1, 4), torch.tensor([[0.0, 1.0]]), table, torch.tensor([13 * DAY]))
    centred = F.normalize(0.5 * table[3] + 0.5 * F.normalize(sums[3, 0] - 0.5 * got[3, 0], dim=0), dim=0)
    assert scores[0, 3] == pytest.approx(float(centred[1]), abs=1e-6)
