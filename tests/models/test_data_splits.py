"""HSTU-protocol sequence building and leave-one-out splits on hand-made data."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from contracts.tokenizer import time_gap_bucket
from models.data import (
    _GAP_THRESHOLDS,
    build_sequences,
    make_split,
    order_ratings,
    time_gap_bucket_array,
    time_gap_buckets,
)
from tests.models.conftest import TinyDataset


def _dataset() -> TinyDataset:
    # user 1: five events; two pairs of tied timestamps. Rows deliberately out of time order.
    ratings = pd.DataFrame(
        [("1", "10", 500, 5.0), ("1", "11", 100, 4.0), ("1", "12", 300, 1.0), ("1", "13", 300, 2.0),
         ("1", "14", 900, 3.0), ("2", "10", 50, 4.0), ("2", "12", 60, 4.0), ("2", "11", 70, 4.0)],
        columns=["user_id", "item_id", "timestamp", "rating"],
    )
    ratings["row"] = range(len(ratings))
    items = pd.DataFrame({"item_id": ["10", "11", "12", "13", "14", "15"], "title": list("abcdef"),
                          "year": pd.array([1990, 1991, None, 1993, 1994, 1995], dtype="Int64"),
                          "genres": [["A"], ["B"], ["A", "B"], [], ["C"], ["A"]]})
    return TinyDataset(ratings, items)


def test_stable_order_keeps_file_order_for_ties():
    data = build_sequences(_dataset(), "stable")
    v = data.vocab.index_of
    assert data.items[0].tolist() == [v("11"), v("12"), v("13"), v("10"), v("14")]
    assert data.times[0].tolist() == [100, 300, 300, 500, 900]


def test_hstu_order_is_pandas_default_sort_by_timestamp():
    ds = _dataset()
    expected = ds.ratings.sort_values("row").reset_index(drop=True).sort_values(by=["timestamp"])
    got = order_ratings(ds.ratings.sample(frac=1.0, random_state=3), "hstu")
    assert got["row"].tolist() == expected["row"].tolist()
    with pytest.raises(ValueError):
        order_ratings(ds.ratings, "random")


def test_vocab_holds_whole_catalog_and_metadata():
    data = build_sequences(_dataset(), "stable")
    assert data.num_items == 6  # item 15 is never rated but is a candidate (HSTU ranks all movies)
    g = data.genre_names
    assert g == ["A", "B", "C"]
    assert data.item_genres[data.vocab.index_of("12")].tolist()[:2] == [1, 2]
    assert data.item_year_bucket[data.vocab.index_of("12")] == 0  # unknown year


def test_leave_one_out_splits():
    data = build_sequences(_dataset(), "stable")
    v = data.vocab.index_of
    train, valid, test = (make_split(data, s, max_len=10) for s in ("train", "valid", "test"))
    # train: events[:-2] = 11, 12, 13 -> inputs 11, 12 predicting 12, 13
    assert train.ids[0, :3].tolist() == [v("11"), v("12"), 0]
    assert train.targets[0, :3].tolist() == [v("12"), v("13"), 0]
    assert train.query_times[0, :2].tolist() == [300, 300]
    # valid: history events[:-2], target events[-2]; test: history events[:-1], target events[-1]
    assert valid.ids[0, :4].tolist() == [v("11"), v("12"), v("13"), 0] and valid.targets[0] == v("10")
    assert test.ids[0, :5].tolist() == [v("11"), v("12"), v("13"), v("10"), 0] and test.targets[0] == v("14")
    assert test.query_times[0, 3] == 900  # the request time of the test position is the target's time
    assert test.lengths.tolist() == [4, 2]
    assert test.target_ratings[0] == 6  # 3 stars -> rating token 6


def test_window_truncates_to_most_recent_and_keeps_older_for_compression():
    data = build_sequences(_dataset(), "stable")
    v = data.vocab.index_of
    test = make_split(data, "test", max_len=2, max_long=5)
    assert test.ids[0].tolist() == [v("13"), v("10")]
    assert test.long_ids[0].tolist()[:2] == [v("11"), v("12")]
    assert test.long_ids[0, 2:].tolist() == [0, 0, 0]


def test_time_gap_buckets_match_tokenizer():
    times = np.array([0, 5, 5, 3600, 100000], dtype=np.int64)
    assert time_gap_buckets(times).tolist() == [time_gap_bucket(g) for g in [0, 5, 0, 3595, 96400]]


def test_vectorised_gap_buckets_equal_the_scalar_tokenizer_everywhere():
    """Serving builds rows with the vectorised buckets: they must be the tokenizer's, value for value."""
    small = np.arange(-3, 100_000)
    edges = np.concatenate([_GAP_THRESHOLDS - 1, _GAP_THRESHOLDS, _GAP_THRESHOLDS + 1])
    large = np.random.default_rng(0).integers(0, 10**12, 20_000)
    for gaps in (small, edges, large):
        expected = np.asarray([time_gap_bucket(float(g)) for g in gaps])
        np.testing.assert_array_equal(time_gap_bucket_array(gaps), expected)
    assert time_gap_bucket_array(np.asarray([10**15])).item() == 63  # past the last threshold: the top bucket


def test_bad_input_is_rejected():
    data = build_sequences(_dataset(), "stable")
    with pytest.raises(ValueError):
        make_split(data, "holdout", max_len=5)
    with pytest.raises(ValueError):
        make_split(data, "test", max_len=0)


@pytest.mark.parametrize("max_len,hop", [(2, 1), (2, 0), (3, 2), (50, 4), (1024, 64)])
def test_window_start_moves_in_hops_and_keeps_between_max_len_minus_hop_and_max_len(max_len, hop):
    from models.data import window_start

    starts = [window_start(count, max_len, hop) for count in range(1, 3 * max_len + 5)]
    for count, start in enumerate(starts, start=1):
        assert start == 0 if count <= max_len else 0 < start <= count
        held = count - start
        assert held <= max_len and (count <= max_len or held >= max_len - max(hop, 1) + 1)
        if hop:
            assert start % hop == 0
    moves = sum(a != b for a, b in zip(starts, starts[1:], strict=False))
    assert moves == (3 * max_len + 4 - max_len + max(hop, 1) - 1) // max(hop, 1)  # once per hop past a full window


def test_valid_and_test_rows_start_where_window_start_says_and_keep_older_events_long():
    data = build_sequences(_dataset(), "stable")
    plain = make_split(data, "test", max_len=2, max_long=4)
    hopped = make_split(data, "test", max_len=2, max_long=4, hop=2)
    # user 1's test history is its first four events: the last two (hop 0), or from index 2 (4 - 2 = 2, a multiple
    # of 2): the same here; with three events before the target (valid) hop 2 starts at index 2, one event held
    assert hopped.lengths[0] == plain.lengths[0] == 2
    valid = make_split(data, "valid", max_len=2, max_long=4, hop=2)
    assert valid.lengths[0] == 1 and valid.ids[0, 0] == data.items[0][2]
    assert valid.long_ids[0, :2].tolist() == data.items[0][:2].tolist()
