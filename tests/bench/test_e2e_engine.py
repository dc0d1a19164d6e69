"""The e2e bench's ``generator-engine`` anchor (bench/e2e_engine.py) on the CPU, in smoke size: a tiny UGT trained
here, synthetic users from its vocabulary, every request's frame through serving's ModelCore. No timing assertions:
only that every request is answered, each looked up in the KV cache as its class says, with a positive latency."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bench.e2e_engine import engine_rows, pack_frames, worker_frames
from bench.e2e_load import make_schedule
from bench.e2e_users import RATE, Users
from bench.serving_gpu_e2e import parse_args


def tiny_users(checkpoint: Path, base_users: int = 40, clones: int = 3, events: int = 8, draws: int = 16) -> Users:
    """``base_users`` users of ``events`` real events (items of the checkpoint's vocabulary) and ``draws`` more,
    ``clones`` ids each; states start with their first ``events`` (short: no window slides)."""
    import torch

    vocab = [str(v) for v in torch.load(checkpoint, map_location="cpu", weights_only=False)["vocab"]]
    rng = np.random.default_rng(0)
    size = events + draws
    items = [[vocab[i] for i in rng.choice(len(vocab), size=size, replace=False)] for _ in range(base_users)]
    times = [[1_000_000 + 60_000 * j for j in range(size)] for _ in range(base_users)]
    ratings = [[8] * size for _ in range(base_users)]
    base = np.arange(base_users * clones) % base_users
    first = np.full(len(base), events, dtype=np.int64)
    return Users(ids=[f"u{i}" for i in range(len(base))], base=base, items=items, times=times, ratings=ratings,
                 shown=first.copy(), first=first, draws=draws, base_users=base_users, events=base_users * events)


def test_worker_frames_batch_as_the_workers_batchers_do():
    times = np.array([0.0, 0.0001, 0.0002, 0.0003, 0.0050, 0.0051, 0.0052])
    members, send = worker_frames(times, workers=2, wait_s=0.001, max_rows=2)
    assert [m.tolist() for m in members] == [[0, 2], [1, 3], [4, 6], [5]]
    assert np.allclose(send, [0.0002, 0.0003, 0.0052, 0.0061])  # full at its last row, else 1 ms after the first
    one, at = worker_frames(times, workers=1, wait_s=0.0, max_rows=1)
    assert [m.tolist() for m in one] == [[r] for r in range(7)] and np.array_equal(at, times)


def test_frames_hold_every_request_built_in_schedule_order(trained):
    from serving.engine_ipc import MODEL, FrameDecoder
    from serving.model_wire import decode_rows
    from serving.ugt_generator import UGTGenerator

    users = tiny_users(trained)
    generator = UGTGenerator(trained, kv_cache_users=len(users.ids), live_items=0, device="cpu")
    schedule = make_schedule(2000.0, 0.5, (0.2, 0.3, 0.5), 30, len(users.ids), seed=1)
    members, _ = worker_frames(schedule.times, 3, 0.001, 8)
    shown = users.shown.copy()
    frames, no_row = pack_frames(generator, users, schedule, 5, members)
    assert no_row == 0 and all(frame is not None for frame in frames) and RATE > 0
    decoded = FrameDecoder().feed(b"".join(frames))
    assert [f.ident for f in decoded] == list(range(len(frames))) and {f.kind for f in decoded} == {MODEL}
    for frame in decoded:
        rows = decode_rows(frame.payload)
        assert rows.keys == [users.ids[int(u)] for u in schedule.users[members[frame.ident]]]
        assert rows.vectors.shape == (len(rows.keys), generator.engine.width)
    assert sum(len(m) for m in members) == len(schedule.times) and max(len(m) for m in members) > 1
    appended = np.bincount(schedule.users[schedule.classes == 2], minlength=len(users.ids))
    assert np.array_equal(users.shown - shown, appended)  # each append's user moved on by one event


@pytest.mark.parametrize("frames", ["workers", "request"])
def test_generator_engine_rows_on_cpu_add_up(trained, frames):
    users = tiny_users(trained)
    args = parse_args(["--smoke", "--checkpoint", str(trained), "--device", "cpu", "--engine-max-rows", "16",
                       "--engine-frames", frames])
    args.mix_shares = tuple(float(x) for x in args.mix.split(","))
    args.duration, args.warm_users = 1.0, 60
    rows = engine_rows(str(trained), users, [200.0], args)  # one rate: a slow shared CPU may stop a second one
    assert [row["config"] for row in rows] == ["generator-engine"]
    for row in rows:
        answered = row["requests"] - row["fallbacks"] - row["errors"]
        assert row["requests"] > 0 and row["errors"] == 0 and row["fallbacks"] == 0
        assert 0 < row["frames"] <= row["requests"] and (frames == "workers" or row["frames"] == row["requests"])
        counted = row["cache_hit"] + row["cache_append"] + row["cache_miss"]
        assert row["cache_repeat"] >= 0 and counted + row["cache_repeat"] == answered
        planned = row["planned_mix"]
        assert sum(planned.values()) == row["requests"]
        assert row["cache_miss"] >= planned["miss"]  # a never-seen user's first request is always a miss
        assert row["cache_hit"] > 0 and row["cache_append"] > 0
        assert 0 < row["p50_ms"] <= row["p99_ms"] <= row["p999_ms"]
        assert 1.0 <= row["mean_batch"] <= 16
