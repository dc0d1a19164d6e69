"""The item-age (freshness) logit term (models/ugt/freshness.py): buckets, ID-less values, the loss and the step's
ID drop."""

from __future__ import annotations

import calendar

import numpy as np
import pytest
import torch

from models.losses import sampled_softmax_loss
from models.ugt.freshness import FreshnessConfig, FreshnessTerm
from models.ugt.model import UGT, UGTConfig


def at(year: int, month: int = 6) -> int:
    return calendar.timegm((year, month, 1, 0, 0, 0))


def test_age_buckets_put_this_and_last_years_releases_together_and_unknown_apart():
    release = np.array([0, 2000, 1999, 1998, 1995, 1990, 1980, 1950, 0])
    term = FreshnessTerm(4, 8, FreshnessConfig(enabled=True), release)
    assert term.query_years(torch.tensor([at(2000, 1), at(2000, 12), at(2003)])).tolist() == [2000, 2000, 2003]
    assert term.buckets(2000).tolist() == [6, 0, 0, 1, 2, 3, 4, 5, 6]  # ages 0, 1 | 2 | 5 | 10 | 20 | 50 | unknown
    assert term.buckets(2001).tolist()[1:3] == [0, 1]  # a year later the 1999 release is 2 years old


def test_the_term_reads_each_items_bucket_and_the_id_less_values_for_items_without_an_id_row():
    release = np.array([0, 2000, 1999, 1990])
    term = FreshnessTerm(3, 3, FreshnessConfig(enabled=True, per_user=False), release)
    with torch.no_grad():
        term.bias.copy_(torch.arange(14, dtype=torch.float32).view(2, 7))  # with ID: 0..6, without: 7..13
    idless = torch.tensor([False, True, False, False])
    out = term(torch.zeros(2, 3), torch.tensor([at(2000), at(2001)]), idless)
    assert out.tolist() == [[6.0, 7.0, 0.0, 3.0],  # 2000: item 1 (age 0, no ID row) reads the ID-less row
                            [6.0, 7.0, 1.0, 4.0]]  # 2001: item 2 is 2 years old, item 3 is 11
    user_term = FreshnessTerm(3, 3, FreshnessConfig(enabled=True, per_user=True), release)
    with torch.no_grad():
        user_term.proj[0, 0] = torch.tensor([1.0, 0.0, 0.0])  # bucket "at most a year old", with an ID row
    out = user_term(torch.tensor([[0.5, 1.0, 0.0]]), torch.tensor([at(2000)]), torch.zeros(4, dtype=torch.bool))
    assert out.tolist() == [[0.0, 0.5, 0.5, 0.0]]
    with pytest.raises(ValueError, match="increasing"):
        FreshnessTerm(3, 3, FreshnessConfig(edges=[3, 2]))


def test_a_bias_for_the_target_lowers_the_loss_and_gets_its_gradient():
    torch.manual_seed(0)
    user = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    table = torch.nn.functional.normalize(torch.randn(11, 8), dim=-1)
    targets = torch.tensor([1, 2, 3, 4])
    plain = sampled_softmax_loss(user, targets, table, 0, 0.1)
    bias = torch.zeros(4, 11, requires_grad=True)
    assert torch.isclose(sampled_softmax_loss(user, targets, table, 0, 0.1, logit_bias=bias), plain)
    boosted = torch.zeros(4, 11)
    boosted[torch.arange(4), targets] = 1.0
    assert sampled_softmax_loss(user, targets, table, 0, 0.1, logit_bias=boosted) < plain
    assert sampled_softmax_loss(user, targets, table, 5, 0.1, logit_bias=boosted * 100) < 1e-3  # sampled path too
    sampled_softmax_loss(user, targets, table, 0, 0.1, logit_bias=bias).backward()
    assert (bias.grad[torch.arange(4), targets] < 0).all()  # raising the target's term lowers the loss


def test_each_step_drops_the_id_rows_of_a_share_of_the_young_items_only_while_training():
    release = np.array([0, 1999, 1999, 1998, 1990, 2000])
    config = UGTConfig(num_items=5, d_model=8, num_layers=1, num_heads=1, dqk=4, dv=4)
    config.freshness = FreshnessConfig(enabled=True, idless_share=1.0)
    model = UGT(config, item_release=release)
    model.freshness.trained[5] = False  # item 5 (2000) arrived after training: 1999 is the latest trained year
    assert model.freshness.young().tolist() == [False, True, True, False, False, False]
    model.train()
    model.start_step()
    ids = torch.arange(6)
    vectors = model.embed.item_vectors(ids)
    assert torch.allclose(vectors[1:3], model.embed.feature_vectors(ids)[1:3])  # no ID row this step
    assert not torch.allclose(vectors[3], model.embed.feature_vectors(ids)[3])
    term = model.freshness_scores(torch.zeros(1, 8), torch.tensor([at(2000)]))
    with torch.no_grad():
        model.freshness.bias[1] += 1.0  # the ID-less values
    shifted = model.freshness_scores(torch.zeros(1, 8), torch.tensor([at(2000)]))
    assert (shifted - term).tolist() == [[0.0, 1.0, 1.0, 0.0, 0.0, 1.0]]  # dropped young items + the new item
    model.eval()  # serving and evaluation: only items without a trained ID row take the ID-less values
    shifted = model.freshness_scores(torch.zeros(1, 8), torch.tensor([at(2000)]))
    assert shifted.tolist()[0][1] == 0.0 and shifted.tolist()[0][5] == 1.0


def test_rows_reserved_for_live_items_take_their_release_year():
    term = FreshnessTerm(4, 2, FreshnessConfig(enabled=True), np.array([0, 1999, 1990]))
    term.reserve(2)
    term.set_release(torch.tensor([4]), np.array([2001]))
    assert term.item_release.tolist() == [0, 1999, 1990, 0, 2001]
    assert term.trained.tolist() == [True, True, True, False, False]
    assert term.buckets(2001).tolist() == [6, 1, 4, 6, 0]  # ages 2, 11, unknown, 0


def test_recent_counts_cover_the_days_before_the_positions_day_only():
    from models.ugt.freshness import recent_count_buckets

    day = 86400
    items = np.array([1, 1, 2, 1, 1, 1])
    times = np.array([0, 10, day, 2 * day, 2 * day + 5, 9 * day]) + 100 * day
    first, table = recent_count_buckets(items, times, 2, 7)
    assert first == 100
    # item 1: 2 events on day 0, 2 on day 2, 1 on day 9; bucket = floor(log2(1 + count over the 7 days before))
    assert table[:, 1].tolist() == [0, 1, 1, 2, 2, 2, 2, 2, 1, 1, 1]
    assert table[:, 2].tolist() == [0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 0]


def test_the_recent_count_term_reads_each_items_bucket_on_the_positions_day():
    day = 86400
    log = (np.array([1, 1, 1, 2]), np.array([0, 1, 2, 3]) + 100 * day)
    term = FreshnessTerm(3, 2, FreshnessConfig(enabled=True, per_user=False, recent_days=3), np.zeros(3, np.int64),
                         log)
    with torch.no_grad():
        term.recent_bias[0] = torch.arange(12, dtype=torch.float32)
        term.recent_bias[1] = 100 + torch.arange(12, dtype=torch.float32)
    out = term.recent_term(torch.zeros(2, 3), torch.tensor([100 * day + 50, 101 * day]),
                           torch.tensor([False, False, True]))
    assert out.tolist() == [[0.0, 0.0, 100.0],  # on the day itself nothing is counted yet
                            [0.0, 2.0, 101.0]]  # next day: item 1 had 3 events (bucket 2); item 2, ID-less, 1
    with pytest.raises(ValueError, match="event log"):
        FreshnessTerm(3, 2, FreshnessConfig(enabled=True, recent_days=3), np.zeros(3, np.int64))
